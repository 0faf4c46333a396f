"""Training stages: supervised warm start (`sft`) and reinforcement learning (`rl`)."""
