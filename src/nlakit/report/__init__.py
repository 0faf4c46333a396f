"""Reports: HTML and Markdown from eval/audit/ladder JSON, and plots."""
