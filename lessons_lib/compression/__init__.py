"""Model compression for inference: pruning, quantisation (weights, activations, KV cache), distillation.

Each technique returns a new model that is called exactly like the tiny LM, so
``generate`` and ``perplexity`` measure every variant the same way (see ``evaluate``).
"""

from .distillation import (STUDENT_CONFIG, STUDENT_PATH, distill, distillation_loss, load_student,
                           new_student)
from .evaluate import (TABLE_HEADER, Measurement, calibration_inputs, decode_rates, heldout_ids, perplexity_change,
                       ratio_rows, relative_error)
from .fp8 import FP8_FORMATS, fake_quantize_fp8, fp8_max, fp8_scale
from .gptq import gptq_quantize, hessian, round_to_nearest
from .kv_quantization import (KV_CACHE_DTYPES, KVQuantizedModel, QuantizedKVCache, QuantizedLayerKVCache,
                              kv_bytes_per_token, kv_tokens_per_gib, with_kv_cache_dtype)
from .pruning import (magnitude_mask, prune_2_4, prune_attention_heads, prune_mlp_channels,
                      prune_unstructured, sparsity_of, two_four_mask)
from .quantization import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8,
                           linear_weight_bytes, model_bytes, quantize_int4, quantize_int8,
                           quantize_model)
from .smoothquant import (fake_quantize_int8, plant_outlier_channels, smooth, smoothing_factors,
                          w8a8_linear)

__all__ = [
    "FP8_FORMATS", "Int4Linear", "Int8Linear", "KVQuantizedModel", "KV_CACHE_DTYPES", "Measurement",
    "QuantizedKVCache", "QuantizedLayerKVCache", "STUDENT_CONFIG", "STUDENT_PATH", "TABLE_HEADER",
    "calibration_inputs", "decode_rates", "dequantize_int4", "dequantize_int8", "distill", "distillation_loss",
    "fake_quantize_fp8", "fake_quantize_int8", "fp8_max", "fp8_scale", "gptq_quantize", "heldout_ids",
    "hessian", "kv_bytes_per_token", "kv_tokens_per_gib", "linear_weight_bytes", "load_student",
    "magnitude_mask", "model_bytes", "new_student", "perplexity_change", "plant_outlier_channels", "prune_2_4",
    "prune_attention_heads", "prune_mlp_channels", "prune_unstructured", "quantize_int4",
    "quantize_int8", "quantize_model", "ratio_rows", "relative_error", "round_to_nearest", "smooth",
    "smoothing_factors", "sparsity_of", "two_four_mask", "w8a8_linear", "with_kv_cache_dtype",
]
