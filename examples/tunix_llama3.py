"""LoRA on a model jlora did not write: Tunix's Llama 3 (NNX), as Google ships it.

Tunix stores its attention kernels as einsum weights (``q_proj/w`` is ``(embed, heads,
head_dim)``, ``o_proj/w`` is ``(heads, head_dim, embed)``) and its embedding table as
``embedder/input_embedding``, none of which flax's naming conventions describe. So the
layouts are read from the model itself (``jlora.infer_layouts``, one abstract trace),
then a tiny Llama 3 learns to continue a repeating token pattern with rank-4 rsLoRA
adapters on its attention and MLP, trained factored (``jlora.lora``: no ``W + s·A·B``
is ever formed). Needs the ``models`` extra (``pip install -e '.[models]'``).

  python examples/tunix_llama3.py
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jlora


def main():
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64,
                                num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10000,
                                norm_eps=1e-5)
    graphdef, state = nnx.split(llama3.Llama3(config, rngs=nnx.Rngs(params=0)))
    # Tunix initialises its MLP kernels to zero; give the "pretrained" base random weights.
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape, x.dtype)
                                         for k, x in zip(keys, leaves, strict=True)])

    batch, length = 8, 16
    tokens = (jnp.arange(batch)[:, None] * 3 + jnp.arange(length)[None] * 5) % config.vocab_size
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))

    def logits_fn(state, tokens):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions, None, mask)
        return logits

    # Tunix's model code relies on rank promotion (e.g. RMSNorm's scale times activations).
    with jax.numpy_rank_promotion("allow"):
        # 1. Where the kernels are and how they are stored, read from the model.
        layouts = jlora.infer_layouts(logits_fn, state, tokens)
        for path, layout in sorted(layouts.items()):
            if path.startswith("layers/0/") or not path.startswith("layers/"):
                print(f"  {path:36s} {layout}")

        # 2. Adapters on attention and MLP, in those layouts.
        targets = r"layers/\d+/(attn/(q|k|v|o)_proj/w|mlp/(gate|up|down)_proj/kernel)"
        lora_config = jlora.LoraConfig(rank=4, alpha=4.0, scaling="rslora", targets=targets,
                                       layouts=layouts)
        adapters = jlora.init(jax.random.key(2), state, lora_config)
        report = jlora.lora_report(logits_fn, state, adapters, tokens)
        assert set(report.values()) == {"factored"}, report
        print(f"\n{len(adapters)} kernels adapted, all factored; "
              f"{sum(a.num_params for a in adapters.values())} trainable parameters")

        # 3. Train only the adapters: next-token prediction on the pattern.
        apply = jlora.lora(logits_fn)

        def loss_fn(ads):
            logits = apply(state, ads, tokens)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        opt = optax.adam(3e-2)

        @jax.jit
        def step(ads, opt_state):
            loss, grads = jax.value_and_grad(loss_fn)(ads)
            updates, opt_state = opt.update(grads, opt_state, ads)
            return optax.apply_updates(ads, updates), opt_state, loss

        opt_state = opt.init(adapters)
        steps, losses = 60, []
        for _ in range(steps):
            adapters, opt_state, loss = step(adapters, opt_state)
            losses.append(float(loss))
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {steps} steps")

        # 4. The factored model equals the merged one.
        merged = logits_fn(jlora.merge(state, adapters), tokens)
        gap = float(jnp.abs(apply(state, adapters, tokens) - merged).max())
        print(f"factored vs merged logits: max difference {gap:.1e}")


if __name__ == "__main__":
    main()
