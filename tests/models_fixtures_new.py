"""Tiny real models for the issue-19 backends (VLM judge, SAM 3, instruction edits, trackers),
built from configs with fixed seeds and saved with ``save_pretrained`` so the stages load them
through the same ``from_pretrained(path)`` a user's config takes. Nothing is downloaded.
Also a loopback OpenAI-compatible server whose replies are computed from each request.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VLM_SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
VLM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vlm_tokenizer():
    """A byte-level BPE tokenizer trained here, with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["Is there a cat in the image? yes", "no", "yes", "How many red circles are there? 0 1 2 3 4 5",
              "What color is the square? red blue green yellow", "left or right", "user assistant"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=VLM_SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")


def tiny_vlm(path: Path, says: str | None = None) -> Path:
    """Qwen2.5-VL at tiny size with its real processor (Qwen2VLImageProcessor, 56-112 px).

    ``says``: set a handful of weights by hand so the model answers that one word to every
    prompt (a real forward pass and a real ``generate``; the decoder blocks write nothing to the
    residual stream, so the last prompt token alone picks the first answer token, and the answer
    token picks end-of-turn). None: random weights, whose replies are noise."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = vlm_tokenizer()
    tok.chat_template = VLM_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in VLM_SPECIAL}
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"], bos_token_id=None,
                         tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if says is not None:
        word = tok.encode(says)
        if len(word) != 1:
            raise ValueError(f"{says!r} is not one token of the tiny vocabulary: {word}")
        last = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"][-1]
        with torch.no_grad():
            lm = model.model.language_model
            for layer in lm.layers:  # the blocks add nothing: the residual is the token embedding
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            lm.norm.weight.zero_()
            lm.norm.weight[0] = 1.0  # only channel 0 reaches the head
            emb = lm.embed_tokens.weight
            emb[:, 0] = 0.0
            emb[last, 0], emb[word[0], 0] = 1.0, -1.0
            head = model.lm_head.weight
            head.zero_()
            head[word[0], 0], head[ids["<|im_end|>"], 0] = 10.0, -10.0
    model.save_pretrained(path)
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                        chat_template=VLM_TEMPLATE).save_pretrained(path)
    return path


class ScriptedOpenAI:
    """A loopback ``/v1/chat/completions`` server whose reply to each request is computed by
    ``respond(body)`` (so answers depend on the question and the image, whatever the order of
    concurrent requests). ``respond`` returns a string (the message content), any JSON value
    (a wrong-typed content), ("status", code[, retry_after]), ("refusal", text), ("slow", seconds, reply)."""

    def __init__(self, respond: Callable[[dict], Any]) -> None:
        self.respond = respond
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                item = outer.respond(body)
                if isinstance(item, tuple) and item[0] == "slow":
                    time.sleep(item[1])
                    item = item[2]
                if isinstance(item, tuple) and item[0] == "status":
                    self.send_response(item[1])
                    if len(item) > 2:
                        self.send_header("Retry-After", str(item[2]))
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                refusal = None
                if isinstance(item, tuple) and item[0] == "refusal":
                    refusal, item = item[1], None
                msg = {"role": "assistant", "content": item, "refusal": refusal}
                data = json.dumps({"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def question_of(body: dict) -> tuple[str, str]:
    """(prompt text, image data URL) of a judge request."""
    content = body["messages"][0]["content"]
    text = next(c["text"] for c in content if c["type"] == "text")
    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
    return text, url


def _sam3_detector(tok: Any, image_size: int, h: int) -> dict[str, Any]:
    """The sub-configs of a tiny SAM 3 detector (``Sam3Config``; the detector of
    ``Sam3VideoConfig``): a 2-layer ViT at ``image_size``, FPN and DETR ``h`` wide, 10 queries."""
    from tests.models_fixtures import _special

    g = image_size // 14  # ViT grid; the FPN scales it by 4, 2, 1
    return dict(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, image_size=image_size, patch_size=14,
                                 window_size=4, global_attn_indexes=[1], pretrain_image_size=56),
            fpn_hidden_size=h, backbone_feature_sizes=[[4 * g, 4 * g], [2 * g, 2 * g], [g, g]]),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, projection_dim=32, **_special(tok)),
        geometry_encoder_config=dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=h, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(hidden_size=h, num_layers=1, num_queries=10, num_attention_heads=2,
                                 intermediate_size=64),
        mask_decoder_config=dict(hidden_size=h, num_upsampling_stages=3, num_attention_heads=2))


def _sam2_tracker(image_size: int, h: int, patch_size: int, grid: int) -> dict[str, Any]:
    """The tracker fields of a tiny ``Sam2VideoConfig`` (and of SAM 3's tracker): prompt encoder,
    mask decoder, 3 memory frames and one memory-attention layer ``h`` wide on a ``grid``."""
    return dict(
        prompt_encoder_config=dict(hidden_size=h, image_size=image_size, patch_size=patch_size, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=h, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
        image_size=image_size, num_maskmem=3, memory_attention_hidden_size=h, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=h, memory_encoder_output_channels=64, mask_downsampler_embed_dim=h,
        memory_fuser_embed_dim=h, memory_fuser_intermediate_dim=64, memory_fuser_num_layers=1)


def tiny_sam3(path: Path, image_size: int = 112) -> Path:
    """Sam3Model at tiny size (2-layer ViT at 112 px, one-layer DETR, 10 queries) with its real
    processor and a CLIP tokenizer written here (SAM 3 pads text to 32 tokens)."""
    import torch
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from tests.models_fixtures import clip_tokenizer

    tok = clip_tokenizer(max_len=32)
    torch.manual_seed(0)
    cfg = Sam3Config(**_sam3_detector(tok, image_size, 32))
    Sam3Model(cfg).eval().save_pretrained(path)
    Sam3Processor(image_processor=Sam3ImageProcessor(size={"height": image_size, "width": image_size}),
                  tokenizer=tok).save_pretrained(path)
    return path


def tiny_sam3_video(path: Path, sees: bool = True, image_size: int = 112) -> Path:
    """Sam3VideoModel at tiny size: the tiny SAM 3 detector of ``tiny_sam3`` (2-layer ViT at
    112 px, 10 queries) with a 64-wide tracker (3 memory frames, one memory-attention layer)
    sharing its vision encoder, low-res masks at 4 x the ViT grid as in the full model, and its
    real processor (Sam3ImageProcessor, Sam2VideoVideoProcessor, a CLIP tokenizer at 32 tokens).

    ``sees``: set the presence head's and the query/text projections' biases so that every
    query scores present (random weights otherwise detect nothing, so nothing is tracked); the
    masks stay random. False: the random model, which finds no instance of anything."""
    import torch
    from transformers import (
        Sam2VideoVideoProcessor,
        Sam3ImageProcessor,
        Sam3VideoConfig,
        Sam3VideoModel,
        Sam3VideoProcessor,
    )

    from tests.models_fixtures import clip_tokenizer

    tok = clip_tokenizer(max_len=32)
    s, g = image_size, image_size // 14
    detector = _sam3_detector(tok, s, 128)
    tracker = dict(vision_config=detector["vision_config"], **_sam2_tracker(s, 128, 14, g))
    torch.manual_seed(0)
    model = Sam3VideoModel(Sam3VideoConfig(detector_config=detector, tracker_config=tracker,
                                           low_res_mask_size=4 * g)).eval()
    if sees:
        det = model.detector_model
        with torch.no_grad():
            det.detr_decoder.presence_head.layer3.bias.fill_(10.0)  # presence logit clamps at 10
            for lin in (det.dot_product_scoring.query_proj, det.dot_product_scoring.text_proj):
                lin.weight.zero_()
                lin.bias.fill_(1.0)  # every query's logit: 128 / sqrt(128) = 11.3
    model.save_pretrained(path)
    Sam3VideoProcessor(image_processor=Sam3ImageProcessor(size={"height": s, "width": s}),
                       video_processor=Sam2VideoVideoProcessor(size={"height": s, "width": s}),
                       tokenizer=tok).save_pretrained(path)
    return path


def tiny_flux_kontext(path: Path, inpaint: bool = False) -> Path:
    """FluxKontextPipeline (or FluxKontextInpaintPipeline: same components) at tiny size, as in
    diffusers' own fast tests; the CLIP tokenizer and a byte-level BPE for the T5 side built here."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextInpaintPipeline,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.models_fixtures import _special, clip_tokenizer

    tok = clip_tokenizer(max_len=16)
    tok2 = vlm_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                      vocab_size=len(tok), max_position_embeddings=16, projection_dim=32,
                                      **_special(tok)))
    torch.manual_seed(0)
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                  pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id))
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    cls = FluxKontextInpaintPipeline if inpaint else FluxKontextPipeline
    cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
        tokenizer_2=tok2, transformer=transformer, image_encoder=None, feature_extractor=None).save_pretrained(path)
    return path

def tiny_qwen_image_edit(path: Path) -> Path:
    """QwenImageEditPipeline at tiny size: the QwenImage transformer and VAE as in diffusers'
    own fast tests, the tiny Qwen2.5-VL above as its text encoder with its processor."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoModelForImageTextToText, AutoProcessor

    vlm = tiny_vlm(path.parent / (path.name + "-vlm"))
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=32,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    proc = AutoProcessor.from_pretrained(vlm)
    QwenImageEditPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                          text_encoder=AutoModelForImageTextToText.from_pretrained(vlm), tokenizer=proc.tokenizer,
                          processor=proc).save_pretrained(path)
    return path


def tiny_sam2_video(path: Path, size: int = 64) -> Path:
    """Sam2VideoModel at tiny size (4-stage Hiera, 16-128 channels, 3 memory frames) with its
    real processor. The memory attention reads 64-channel memories (a constant of the model),
    and the object pointer is split into hidden/64 tokens, so hidden sizes are 128."""
    import torch
    from transformers import (
        Sam2ImageProcessor,
        Sam2VideoConfig,
        Sam2VideoModel,
        Sam2VideoProcessor,
        Sam2VideoVideoProcessor,
    )

    s, h = size, 128
    torch.manual_seed(0)
    cfg = Sam2VideoConfig(
        vision_config=dict(
            backbone_config=dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[s, s],
                                 blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                                 num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[4, 4, 4, 4],
                                 global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2]),
            backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=h,
            backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]]),
        **_sam2_tracker(s, h, 16, s // 16))
    model = Sam2VideoModel(cfg).eval()
    with torch.no_grad():  # random weights score every object absent (masks all "no object"): the
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)  # presence head says present
    model.save_pretrained(path)
    Sam2VideoProcessor(image_processor=Sam2ImageProcessor(size={"height": s, "width": s},
                                                              mask_size={"height": s // 4, "width": s // 4}),
                       video_processor=Sam2VideoVideoProcessor(size={"height": s, "width": s})).save_pretrained(path)
    return path
