"""Tiny real pipelines for the remover backends (issue 31): SDXL inpainting (the RORem class),
FLUX.1 Fill and FLUX.2 klein inpainting, each built from configs with fixed seeds as in
diffusers' own fast tests and saved with ``save_pretrained``, so the stages load them through
the same ``from_pretrained(path)`` a user's config takes; and removal LoRAs on their
transformers saved with the pipelines' ``save_lora_weights`` (safetensors), as a trainer would.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path


def tiny_sdxl_inpaint(path: Path) -> Path:
    """StableDiffusionXLInpaintPipeline with a 9-channel UNet (an inpainting fine-tune such as
    RORem), two CLIP text encoders (the second with a projection), native 32 px."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tests.models_fixtures import _special, clip_tokenizer

    tok = clip_tokenizer()
    torch.manual_seed(0)
    # add_time_ids: 6 numbers (original size, crop, target size) x 8 + the pooled 16 = 64
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=64,
                                cross_attention_dim=32, norm_num_groups=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    te_cfg = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                  vocab_size=len(tok), max_position_embeddings=16, projection_dim=16, **_special(tok))
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    torch.manual_seed(0)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                   timestep_spacing="leading")
    StableDiffusionXLInpaintPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, requires_aesthetics_score=False,
                                     force_zeros_for_empty_prompt=True).save_pretrained(path)
    return path


def tiny_flux_fill(path: Path) -> Path:
    """FluxFillPipeline: the transformer reads the noisy latents, the masked image and the mask
    (2 latent channels: 8 + 8 packed, mask 4), CLIP + T5 text encoders; native 32 px."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.models_fixtures import _special, clip_tokenizer
    from tests.models_fixtures_new import vlm_tokenizer

    tok, tok2 = clip_tokenizer(max_len=16), vlm_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=20, out_channels=8, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=True)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                      vocab_size=len(tok), max_position_embeddings=16, projection_dim=32,
                                      **_special(tok)))
    torch.manual_seed(0)
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                  pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id))
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=2, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    FluxFillPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                     text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer).save_pretrained(path)
    return path


def tiny_flux2_klein(path: Path) -> Path:
    """Flux2KleinInpaintPipeline (``is_distilled``: the 4-step klein, no CFG): Flux2 transformer,
    AutoencoderKLFlux2, a 2-layer Qwen3 text encoder with a chat-template tokenizer; native 32 px."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinInpaintPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.models_fixtures_new import VLM_TEMPLATE, vlm_tokenizer

    tok = vlm_tokenizer()
    tok.chat_template = VLM_TEMPLATE
    torch.manual_seed(0)
    # joint_attention_dim = hidden size x the one text-encoder layer read (text_encoder_out_layers: [1])
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    torch.manual_seed(0)
    te = Qwen3ForCausalLM(Qwen3Config(intermediate_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=8, vocab_size=len(tok), max_position_embeddings=512,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                             latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    Flux2KleinInpaintPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                              transformer=transformer, is_distilled=True).save_pretrained(path)
    return path


def transformer_lora(path: Path, base: Path, pipeline: str, *, seed: int = 1, rank: int = 4) -> Path:
    """A removal LoRA on a tiny FLUX transformer's attention projections, saved with the
    pipeline's ``save_lora_weights`` (safetensors, diffusers keys ``transformer.…``). Its
    up-projections are random (peft starts them at zero: a no-op adapter)."""
    import diffusers
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cls = getattr(diffusers, pipeline)
    transformer_cls = diffusers.Flux2Transformer2DModel if pipeline.startswith("Flux2") else diffusers.FluxTransformer2DModel
    transformer = transformer_cls.from_pretrained(base / "transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, prm in transformer.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.5)
    cls.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                          safe_serialization=True)
    return path
