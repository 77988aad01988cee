"""How far merge/unmerge cycles move a low-precision kernel, jlora versus a naive merge.

jlora forms ``W ± s·A@B`` in float32 and rounds once to the kernel's dtype; a naive
merge (what a framework does when it adds the update in the kernel's own dtype) also
rounds the update itself. Prints, per dtype and number of merge/unmerge cycles, the
largest and mean absolute drift from the original kernel in units of the dtype's eps
times max(|W|, |W + s·A@B|) (one rounding of the merged value), and the share of
entries that changed at all.

  python benchmarks/bench_merge_drift.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def naive_merge(w, ad, sign):
    return w + (sign * ad.delta()).astype(w.dtype)


def drift_table(dtype, cycles=(1, 10, 100), shape=(1024, 1024), rank=16):
    w0 = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    params = {"k": w0}
    ads = jlora.init(jax.random.key(1), params, jlora.LoraConfig(rank=rank, alpha=32.0,
                                                                   targets="k"))
    ad = ads["k"].replace(b=0.02 * jax.random.normal(jax.random.key(2), ads["k"].b.shape))
    ads = {"k": ad}
    merge = jax.jit(jlora.merge)
    unmerge = jax.jit(jlora.unmerge)
    naive = jax.jit(lambda w, s: naive_merge(w, ad, s), static_argnums=1)
    eps = float(jnp.finfo(dtype).eps)
    ref = np.asarray(w0, np.float64)
    # One rounding of the merged value can move W by up to eps·max(|W|, |W + delta|)/2.
    merged = ref + np.asarray(ad.delta(), np.float64)
    scale = eps * np.maximum(np.abs(ref), np.abs(merged))
    rows = []
    w_j, w_n = params, w0
    done = 0
    for n in cycles:
        for _ in range(n - done):
            w_j = unmerge(merge(w_j, ads), ads)
            w_n = naive(naive(w_n, +1), -1)
        done = n
        for name, w in (("jlora (float32 accumulation)", w_j["k"]), ("naive (in dtype)", w_n)):
            err = np.abs(np.asarray(w, np.float64) - ref) / scale
            rows.append((np.dtype(dtype).name, n, name, err.max(), err.mean(),
                         float(np.mean(np.asarray(w) != np.asarray(w0)))))
    return rows


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; kernel 1024x1024, rank 16, "
          "alpha 32; drift in units of eps·max(|W|, |W+delta|)")
    print(f"{'dtype':9} {'cycles':>6}  {'merge':30} {'max':>8} {'mean':>8} {'changed':>8}")
    for dtype in (jnp.bfloat16, jnp.float16):
        for dt, n, name, mx, mean, changed in drift_table(dtype):
            print(f"{dt:9} {n:>6}  {name:30} {mx:8.2f} {mean:8.3f} {changed:8.1%}")


if __name__ == "__main__":
    main()
