"""Component builders for the two pipelines, at tiny or full architecture size, random weights.

`tiny` is what the embedded pack ships (fast on a CPU, every structural rule of the real model
kept: rope axes sum to the head dim, joint attention dim = text hidden size, latent channels,
VAE scale factor 8, tokenizer special-token ids). `full` is the real published configuration,
used on a GPU to measure memory and speed without downloading the weights.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from flen_resources.models import tiny_tokenizers as tt
from flen_resources.models.registry import release_flags

Scale = Literal["tiny", "full"]


def patch_qwen2vl_processor_without_torchvision() -> None:
    """transformers 5: drop Qwen2VLProcessor's video processor (the pipeline uses images only).

    Without torchvision its dummy video-processor class breaks __init__, save_pretrained and
    from_pretrained; with torchvision, __init__ refuses the missing (None) video processor that the
    builders pass. So it applies with or without torchvision: every process that builds or loads
    the Qwen pipeline calls this, and both kinds of machine build and load the same folders.
    """
    from transformers import Qwen2VLProcessor

    if getattr(Qwen2VLProcessor, "_flen_patched", False):
        return
    original = Qwen2VLProcessor.get_attributes.__func__
    Qwen2VLProcessor.get_attributes = classmethod(lambda cls: [a for a in original(cls) if a != "video_processor"])
    Qwen2VLProcessor._flen_patched = True


# Real scheduler configs, as published with the models.
QWEN_SCHEDULER = dict(base_image_seq_len=256, base_shift=math.log(3), max_image_seq_len=8192, max_shift=math.log(3),
                      num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                      use_dynamic_shifting=True)
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)

QWEN_TRANSFORMER = {
    "full": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    # bitsandbytes' CPU kernels want Linear dims in multiples of 64: inner dim 64.
    "tiny": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=64, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
}
QWEN_VAE = {
    "full": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    "tiny": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]),
}
QWEN_TEXT = {  # Qwen2.5-VL-7B-Instruct
    "full": dict(text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                           rms_norm_eps=1e-6, mrope_section=[16, 24, 24]),
                 vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                             fullatt_block_indexes=[7, 15, 23, 31])),
    "tiny": dict(text=dict(vocab_size=None, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                           rms_norm_eps=1e-6, mrope_section=[4, 6, 6]),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                             fullatt_block_indexes=[1])),
}


def build_qwen_edit_components(scale: Scale = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                                device: str | torch.device = "cpu",
                                model: str = "qwen-image-edit-2509") -> dict[str, Any]:
    """Components of QwenImageEditPlusPipeline for the release `model` (registry.QWEN_EDIT_MODELS: the
    releases differ in their transformer's flags only, so one seed gives them the same weights)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch_qwen2vl_processor_without_torchvision()
    tokenizer = tt.build_qwen2_tokenizer(vocab_size=1024)
    tid = tokenizer.convert_tokens_to_ids
    text, vision = QWEN_TEXT[scale]["text"], QWEN_TEXT[scale]["vision"]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": text["vocab_size"] or len(tokenizer),
            "hidden_size": text["hidden_size"], "intermediate_size": text["intermediate_size"],
            "num_hidden_layers": text["num_hidden_layers"], "num_attention_heads": text["num_attention_heads"],
            "num_key_value_heads": text["num_key_value_heads"],
            "max_position_embeddings": text["max_position_embeddings"], "rms_norm_eps": text["rms_norm_eps"],
            "rope_parameters": {"rope_type": "default", "mrope_section": text["mrope_section"], "rope_theta": 1000000.0},
            "bos_token_id": tid("<|endoftext|>"), "eos_token_id": tid("<|im_end|>"),
        },
        vision_config={**vision, "window_size": 112, "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        # The special-token ids must be the tokenizer's (real: 151655/151656/151652/151653).
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            transformer = QwenImageTransformer2DModel(**QWEN_TRANSFORMER[scale], **release_flags(model))
            torch.manual_seed(seed)
            vae = AutoencoderKLQwenImage(**QWEN_VAE[scale])
            torch.manual_seed(seed)
            text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
            "text_encoder": text_encoder, "tokenizer": tokenizer, "processor": processor}


FLUX_TRANSFORMER = {
    "full": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56)),
    "tiny": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6)),
}
FLUX_CLIP = {"full": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          projection_dim=768),
             "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                          projection_dim=64)}
FLUX_T5 = {"full": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
           "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)}
FLUX_VAE = {"full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
            "tiny": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)}


def build_flux_components(scale: Scale = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> dict[str, Any]:
    """Components of FluxPipeline (FLUX.1-dev layout: guidance-distilled, CLIP-L + T5-XXL)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = tt.build_clip_tokenizer(vocab_size=1000)
    t5_tok = tt.build_t5_tokenizer(vocab_size=1000)
    clip_cfg = CLIPTextConfig(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                              pad_token_id=clip_tok.pad_token_id, layer_norm_eps=1e-05, hidden_act="quick_gelu",
                              vocab_size=49408 if scale == "full" else len(clip_tok), max_position_embeddings=77,
                              **FLUX_CLIP[scale])
    t5_cfg = T5Config(vocab_size=32128 if scale == "full" else len(t5_tok), relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
                      pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=0,
                      tie_word_embeddings=False, **FLUX_T5[scale])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER[scale])
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(clip_cfg)
            torch.manual_seed(seed)
            text_encoder_2 = T5EncoderModel(t5_cfg)
            torch.manual_seed(seed)
            vae = AutoencoderKL(sample_size=64 if scale == "tiny" else 1024, in_channels=3, out_channels=3,
                                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                shift_factor=0.1159, scaling_factor=0.3611, **FLUX_VAE[scale])
    finally:
        torch.set_default_dtype(previous)
    return {"scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2, "tokenizer": clip_tok, "tokenizer_2": t5_tok,
            "transformer": transformer, "vae": vae, "image_encoder": None, "feature_extractor": None}
