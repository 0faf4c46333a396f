"""Run a GPU pipeline config on the CPU with a few steps per stage, on a *random* model that has
the exact architecture of the config's target (no download): it checks that every stage accepts
the recipe's shapes (d_model, layer, heads, batch settings) before anyone rents a GPU for it.

    python scripts/shape_check_gpu_config.py configs/gpu-qwen2.5-0.5b.yaml

Only Qwen2.5-0.5B-Instruct's architecture is built in (QWEN25_05B below, copied from its
config.json); the tokenizer is nlakit's tiny test tokenizer, so the text is meaningless.
Training uses LoRA here (see TINY_STEPS): the shapes are the recipe's, the memory is not.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, use_sliding_window=False)

TINY_STEPS = [
    "device=cpu", "dtype=float32",
    "extract.corpus=builtin:docs", "extract.max_docs=12", "extract.max_tokens_per_doc=160",
    "extract.min_position=20", "extract.positions_per_doc=4", "extract.batch_size=4",
    "label.labeller=context", "label.options={}",
    # LoRA instead of the recipe's full fine-tuning: full fine-tuning of a 0.5B model in fp32
    # (policy, frozen reference, AR, gradients, Adam states) needs ~17 GB of RAM on a CPU.
    "train_av.lora_rank=8", "train_ar.lora_rank=8", "train_rl.lora_rank=8",
    "train_rl.ar_lora_rank=8",
    "train_av.max_steps=1", "train_av.batch_size=2", "train_av.grad_accum=1",
    "train_av.eval_rows=2", "train_av.max_response_tokens=32",
    "train_ar.max_steps=1", "train_ar.batch_size=2", "train_ar.grad_accum=1",
    "train_ar.eval_rows=2",
    "train_rl.max_steps=1", "train_rl.batch_size=2", "train_rl.group_size=2",
    "train_rl.max_new_tokens=8", "train_rl.eval_rows=2", "train_rl.rollout_batch_size=4",
    "eval.max_rows=4", "eval.max_new_tokens=8", "eval.batch_size=4", "eval.n_boot=50",
    "audit.max_rows=4", "audit.max_new_tokens=8", "audit.batch_size=4", "audit.n_boot=50",
]


def main(config: str) -> int:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nlakit.model.testing import make_tiny_tokenizer
    from nlakit.report.tables import format_pipeline_summary
    from nlakit.run.pipeline import load_config, run_pipeline

    cfg = load_config(config)
    if "qwen2.5-0.5b" not in cfg.model.lower():
        raise SystemExit(f"only Qwen2.5-0.5B's architecture is built in; {cfg.model} is not it")
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tiny_tokenizer()
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
        model_dir = Path(tmp) / "qwen2.5-0.5b-shaped"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        t0 = time.perf_counter()
        summary = run_pipeline(load_config(config, [f"model={model_dir}",
                                                    f"runs_dir={tmp}/runs", *TINY_STEPS]))
        print(format_pipeline_summary(summary))
        print(f"all stages ran on the {QWEN25_05B['num_hidden_layers']}-block, "
              f"d={QWEN25_05B['hidden_size']} architecture at layer {cfg.layer} in "
              f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "configs/gpu-qwen2.5-0.5b.yaml"))
