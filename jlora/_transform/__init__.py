"""The factored transform's machinery (private). Its public names: ``jlora.lora``,
``jlora.lora_report``, ``jlora.collect_inputs`` and ``jlora.FactoredFallbackWarning``.

==================  ====================================================================
``factored.py``     the factored value (``Factored``, ``Meta``) and its carried arrays
``interpreter.py``  the evaluation loop, the rule registry, ``Run`` (per-call state)
``moves.py``        transpose, reshape, broadcast, slices, rev, casts, identities
``dot.py``          ``dot_general``: a plan, then an emitter (custom VJP or einsums)
``fusion.py``       shared-input fusion of dots (an emitter of ``dot.py``)
``consumers.py``    ``conv_general_dilated`` and embedding ``gather``
``ragged.py``       ``ragged_dot`` with factored expert kernels (mixture of experts)
``grouped.py``      grouped batches: a bank of adapters, one per example, in one pass
``control_flow.py`` jit, closed_call, checkpoint, scan, while, cond, custom derivatives
``quantized.py``    quantized kernels: ``dequantize`` and dequantization at the consumer
``dropout.py``      PEFT's lora_dropout on the adapter branch
``collect.py``      input collection for ``jlora.collect_inputs``
``entry.py``        the factored value each kernel enters as
``api.py``          ``lora``, ``lora_report``, ``collect_inputs``
==================  ====================================================================

``fn`` is traced once per input signature by ``jlora/_tracing.py``, which
``jlora.infer_layouts`` shares. See ``docs/architecture.md`` ("The factored transform")
for how a call flows.
"""

# Rules register themselves on import; the loop finds them in interpreter.RULES.
from jlora._transform import consumers as consumers
from jlora._transform import control_flow as control_flow
from jlora._transform import dot as dot
from jlora._transform import fusion as fusion
from jlora._transform import grouped as grouped
from jlora._transform import moves as moves
from jlora._transform import quantized as quantized
from jlora._transform import ragged as ragged
