"""Name templates: transformers' module names for the parameter trees of the ``gemma``
package, Tunix and MaxText (see :mod:`jlora.peft._templates`).

Example:
  >>> import jlora
  >>> t = jlora.peft.templates.tunix()
  >>> t("layers/0/attn/o_proj/w"), t.layout_patterns[r"layers/\\d+/attn/o_proj/w"]
  ('model.layers.0.self_attn.o_proj', 'iio')
"""

from jlora.peft._templates import Template as Template
from jlora.peft._templates import gemma as gemma
from jlora.peft._templates import maxtext as maxtext
from jlora.peft._templates import tunix as tunix

__all__ = ["Template", "gemma", "maxtext", "tunix"]
