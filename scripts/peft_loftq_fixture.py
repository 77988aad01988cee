"""The LoftQ fixture of tests/test_loftq.py, made by scripts/make_peft_fixtures.py (which
imports this module; run that script, or ``--case loftq`` for this fixture alone).

PEFT's own ``loftq_init`` (``peft/utils/loftq_utils.py``) on one torch weight. Since
PEFT 0.20 that function quantizes with bitsandbytes on a CUDA device only; PEFT 0.19.1's
runs on the CPU in plain torch with its own ``NFQuantizer`` (NF4: the weight flattened
in C order, blocks of 64, each block's absolute maximum in float32, the nearest of 16
values that equal bitsandbytes' NF4 table bit for bit), wherever bitsandbytes has no 4-bit
support. So this module fetches PEFT 0.19.1's wheel with pip, loads that one file from it
(its imports resolve against the installed PEFT), and runs its ``loftq_init`` unchanged;
the ``bitsandbytes`` import at its top, unused on that path, is given an empty module.
The loop of quantizing and decomposing is the same in PEFT 0.19.1 and 0.21.2.

Writes ``tests/fixtures/peft/loftq/``: ``loftq.safetensors`` holds ``weight`` (torch's
``(out, in)``) and, per case, ``<case>/base`` (PEFT's dequantized weight), ``<case>/lora_A``
``(r, in)`` and ``<case>/lora_B`` ``(out, r)``; ``loftq.json`` the cases' settings and
the versions (no ``case.json``: tests/test_peft.py's generic cases skip it).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import types
import warnings
import zipfile

import numpy as np
import safetensors.numpy

PEFT_WITH_NFQUANTIZER = "0.19.1"
SHAPE = (32, 96)  # (out, in): 96 is not a multiple of 64, so blocks straddle rows
CASES = {
    "bits4_iter1": dict(num_bits=4, reduced_rank=4, num_iter=1),
    "bits4_iter5": dict(num_bits=4, reduced_rank=4, num_iter=5),
}


def peft_loftq_utils(tmp: pathlib.Path) -> types.ModuleType:
    """PEFT 0.19.1's ``peft/utils/loftq_utils.py``, loaded as a module of its own."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    f"peft=={PEFT_WITH_NFQUANTIZER}", "-d", str(tmp)], check=True)
    wheel = next(tmp.glob(f"peft-{PEFT_WITH_NFQUANTIZER}-*.whl"))
    source = tmp / "loftq_utils.py"
    with zipfile.ZipFile(wheel) as zf:
        source.write_bytes(zf.read("peft/utils/loftq_utils.py"))
    spec = importlib.util.spec_from_file_location("peft_loftq_utils_0_19_1", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # loftq_init imports bitsandbytes first thing and refuses without it, but with no
    # 4-bit bitsandbytes it quantizes with NFQuantizer and never touches the module.
    sys.modules.setdefault("bitsandbytes", types.ModuleType("bitsandbytes"))
    module.is_bnb_available = lambda: True  # pyright: ignore[reportAttributeAccessIssue]
    module.is_bnb_4bit_available = lambda: False  # pyright: ignore[reportAttributeAccessIssue]
    return module


def make(out_root: pathlib.Path) -> None:
    import peft
    import torch

    out = out_root / "loftq"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        loftq = peft_loftq_utils(pathlib.Path(tmp))
        weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.05
        tensors = {"weight": weight.numpy()}
        for name, kwargs in CASES.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # NFQuantizer's notice
                base, lora_a, lora_b = loftq.loftq_init(weight.clone(), **kwargs)
            tensors |= {f"{name}/base": base.numpy(), f"{name}/lora_A": lora_a.numpy(),
                        f"{name}/lora_B": lora_b.numpy()}
            err = lambda w: float(torch.linalg.norm(w - weight) / torch.linalg.norm(weight))
            print(f"loftq {name}: |W - Q| {err(base):.4f}, |W - (Q + B A)| "
                  f"{err(base + lora_b @ lora_a):.4f}")
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    safetensors.numpy.save_file(arrays, str(out / "loftq.safetensors"))
    (out / "loftq.json").write_text(json.dumps({
        "peft_loftq_utils": PEFT_WITH_NFQUANTIZER, "peft": peft.__version__,
        "torch": torch.__version__, "cases": CASES,
    }, indent=2) + "\n")
