"""Model compression for inference: pruning, weight-only quantisation, distillation.

Each technique returns a new model that is called exactly like the tiny LM, so
``generate`` and ``perplexity`` measure every variant the same way (see ``evaluate``).
"""

from .distillation import (STUDENT_CONFIG, STUDENT_PATH, distill, distillation_loss, load_student,
                           new_student)
from .evaluate import TABLE_HEADER, Measurement, decode_rates, heldout_ids, ratio_rows
from .pruning import (magnitude_mask, prune_2_4, prune_attention_heads, prune_mlp_channels,
                      prune_unstructured, sparsity_of, two_four_mask)
from .quantization import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8,
                           linear_weight_bytes, model_bytes, quantize_int4, quantize_int8,
                           quantize_model)

__all__ = [
    "Int4Linear", "Int8Linear", "Measurement", "STUDENT_CONFIG", "STUDENT_PATH", "TABLE_HEADER",
    "decode_rates", "dequantize_int4", "dequantize_int8", "distill", "distillation_loss",
    "heldout_ids", "linear_weight_bytes", "load_student", "magnitude_mask", "model_bytes",
    "new_student", "prune_2_4", "prune_attention_heads", "prune_mlp_channels", "prune_unstructured",
    "quantize_int4", "quantize_int8", "quantize_model", "ratio_rows",
    "sparsity_of", "two_four_mask",
]
