"""Fine-tune transformers' Flax Llama with jlora, then hand the adapter to PyTorch's PEFT.

1. A tiny Llama, transformers' ``FlaxLlamaForCausalLM`` with a random configuration (no
   download), reads bytes (vocabulary 256): the standard library's ``.py`` sources.
2. rsLoRA adapters on every attention and MLP projection, their layouts read from the
   model (``jlora.infer_layouts``), trained factored (``jlora.lora``) on next-byte
   prediction; the embedding and the output head stay frozen.
3. ``jlora.peft.save`` writes a PEFT adapter directory. jlora's default module names are
   the Flax parameter paths joined with dots, ``model.layers.0.self_attn.q_proj``: the
   torch model's own names, so no ``names=`` is needed.
4. When torch and peft are installed: transformers converts the Flax base model to its
   torch ``LlamaForCausalLM``, ``PeftModel.from_pretrained`` loads the adapter onto it, and
   the script prints the largest difference between PEFT's logits and jlora's.

Needs the ``models`` extra (``pip install -e '.[models]'``); the torch check also needs
``pip install torch peft``. About half a minute on 2 CPU cores::

  python examples/to_peft.py --out /tmp/to_peft
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jlora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the _lm_* helpers

import _lm_data as data_lib  # noqa: E402

TARGETS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-bytes", type=int, default=400_000,
                   help="bytes of stdlib source to sample windows from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "jlora_to_peft"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def tiny_llama(seq_len: int, seed: int):
    from transformers import FlaxLlamaForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(seq_len, 128), tie_word_embeddings=False)
    return FlaxLlamaForCausalLM(config, seed=seed)


def train(apply, params, adapters, text, args):
    """``args.steps`` adamw steps on random windows of ``text``; the trained adapters and
    the losses."""
    rng = np.random.default_rng(args.seed)

    def sample():
        starts = rng.integers(0, len(text) - args.seq_len - 1, args.batch)
        return jnp.asarray(np.stack([text[s:s + args.seq_len + 1] for s in starts]), jnp.int32)

    def loss_fn(ads, batch):
        logits = jlora.lora(apply)(params, ads, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    opt = optax.adamw(args.lr)

    @jax.jit
    def step(ads, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(ads, batch)
        updates, opt_state = opt.update(grads, opt_state, ads)
        return optax.apply_updates(ads, updates), opt_state, loss

    opt_state, losses = opt.init(adapters), []
    bar = tqdm(range(args.steps), desc="LoRA", disable=args.no_progress, dynamic_ncols=True)
    for i in bar:
        adapters, opt_state, loss = step(adapters, opt_state, sample())
        losses.append(float(loss))
        if (i + 1) % 10 == 0 or i + 1 == args.steps:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return adapters, losses


def torch_check(model, params, adapter_dir: Path, ids: np.ndarray, jlora_logits) -> float | None:
    """The largest |PEFT logit - jlora logit| on ``ids``, or None without torch and peft."""
    try:
        import torch
        import torch.distributed.tensor  # noqa: F401  (torch 2.13: PEFT's loader needs it)
        from peft import PeftModel
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"\ntorch check skipped ({e.name} is not installed: pip install torch peft)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, params=params)  # the base, which transformers converts
        base = LlamaForCausalLM.from_pretrained(tmp, from_flax=True).eval()
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(ids).long()).logits.numpy()
    return float(np.abs(theirs - np.asarray(jlora_logits)).max())


def main(argv=None):
    args = parse_args(argv)
    started = time.time()
    text, files = data_lib.stdlib_sources(args.data_bytes)
    model = tiny_llama(args.seq_len, args.seed)
    params = model.params

    def apply(params, ids):
        return model(ids, params=params).logits

    ids = jnp.asarray(text[: 2 * args.seq_len].reshape(2, args.seq_len), jnp.int32)
    layouts = {p: lay for p, lay in jlora.infer_layouts(apply, params, ids).items()
               if re.fullmatch(TARGETS, p)}  # LoraConfig takes layouts of targets only
    config = jlora.LoraConfig(rank=args.rank, alpha=args.alpha, scaling="rslora",
                              targets=TARGETS, layouts=layouts)
    adapters = jlora.init(jax.random.key(args.seed), params, config)
    adapters, losses = train(apply, params, adapters, text, args)

    out = Path(args.out)
    adapter_dir = jlora.peft.save(out / "peft", adapters)
    peft_config = json.loads((adapter_dir / jlora.peft.CONFIG_NAME).read_text())
    jlora_logits = apply(jlora.merge(params, adapters), ids)
    gap = torch_check(model, params, adapter_dir, np.asarray(ids), jlora_logits)

    kinds = sorted({p.rsplit("/", 2)[-2] for p in adapters})
    print(f"\ndata: {len(text):,} bytes of {files} stdlib files; model: Flax Llama, "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters (random init)")
    print(f"LoRA: rank {args.rank}, rsLoRA scale {next(iter(adapters.values())).scale:.3g}, "
          f"{len(adapters)} kernels ({', '.join(kinds)}), "
          f"{sum(a.num_params for a in adapters.values()):,} trainable parameters")
    print(f"trained {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"PEFT adapter: {adapter_dir} ({len(peft_config['target_modules'])} modules, "
          f"r={peft_config['r']}, lora_alpha={peft_config['lora_alpha']}, "
          f"use_rslora={peft_config['use_rslora']}), e.g. {peft_config['target_modules'][0]}")
    if gap is not None:
        print(f"PEFT in torch vs jlora: largest logit difference {gap:.2e}")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
