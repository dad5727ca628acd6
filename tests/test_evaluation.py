"""The evaluation's metrics through their real code, on inputs and tiny models built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_recipe.core.config import Probe
from controlnet_recipe.evaluation.probes import ProbeSet
from controlnet_recipe.evaluation.quality import fid_kid
from controlnet_recipe.evaluation.stats import mean_ci, paired_diff_ci
from controlnet_recipe.evaluation.sweep import choose
from controlnet_recipe.faces.draw import face_scale
from controlnet_recipe.faces.synthetic import make_face
from controlnet_recipe.metrics.landmarks import landmark_fidelity, nme
from controlnet_recipe.training.batches import derangement


def test_nme_is_normalised_by_the_inter_ocular_distance():
    _, lm, _ = make_face(0, 64)
    assert nme(lm, lm)["all"] == 0.0
    shifted = lm + np.array([3.0, 4.0], dtype=np.float32)  # every point 5 px off
    e = nme(shifted, lm)
    assert e["all"] == pytest.approx(5 / face_scale(lm), rel=1e-5)
    assert e["eyes"] == pytest.approx(e["all"], rel=1e-5)


def test_landmark_fidelity_counts_failures_and_redraws():
    _, a, _ = make_face(0, 64)
    _, b, _ = make_face(1, 64)
    out = landmark_fidelity([a, b, None], [a, a, a], (64, 64))
    assert out["found"].tolist() == [1.0, 1.0, 0.0]
    assert out["nme"][0] == 0.0 and out["nme"][1] > 0.05 and np.isnan(out["nme"][2])
    assert out["miou"][0] == 1.0 and 0.0 < out["miou"][1] < 1.0 and out["miou"][2] == 0.0


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 0.1, 200)
    m, lo, hi = mean_ci(x, 1000)
    assert lo < m < hi and lo < 1.0 < hi and hi - lo < 0.05
    assert mean_ci([np.nan, 2.0, 2.0], 1000) == (2.0, 2.0, 2.0)
    d, lo, hi = paired_diff_ci(x + 0.5, x, 1000)
    assert d == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    d, lo, hi = paired_diff_ci(x, rng.permutation(x), 1000)
    assert lo < 0 < hi  # no difference: the interval straddles zero


def test_checkpoint_rule():
    rows = [
        {"step": 250, "miou": 0.10, "forgetting": 0.0},
        {"step": 500, "miou": 0.19, "forgetting": 0.1},
        {"step": 750, "miou": 0.20, "forgetting": 0.3},
        {"step": 1000, "miou": 0.18, "forgetting": 0.0},
    ]
    chosen, why = choose(rows, "miou", tolerance=0.05, max_forgetting=0.25)
    # 750 forgets too much; among the rest the best is 0.19 and 500 is the earliest within 5%.
    assert chosen["step"] == 500 and "forgetting <= 0.25" in why
    assert choose(rows, "miou", tolerance=0.0, max_forgetting=1.0)[0]["step"] == 750
    chosen, why = choose(rows, "miou", tolerance=0.5, max_forgetting=0.25)
    assert chosen["step"] == 250
    chosen, why = choose([{**r, "forgetting": 0.9} for r in rows], "miou", tolerance=0.05, max_forgetting=0.25)
    assert chosen["step"] == 500 and "no checkpoint" in why  # none forgets little enough: all compete


def test_derangement_pairs_every_sample_with_another():
    for n in (2, 3, 17, 100):
        p = derangement(n, seed=n)
        assert sorted(p.tolist()) == list(range(n))
        assert not (p == torch.arange(n)).any()
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_probe_set_pairs_prompts_conditions_and_labels():
    conds = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    probes = ProbeSet.build([Probe(prompt="a cat", concept="cat"), Probe(prompt="a dog")], conds, seed=5)
    assert probes.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert probes.labels == ["cat", "a dog"] and probes.truth.tolist() == [0, 0, 1, 1]
    assert len(set(probes.seeds)) == 4


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small CLIP trained for a few steps on coloured squares, saved and loaded back."""
    from controlnet_recipe.metrics.clip import Clip
    from controlnet_recipe.models.tiny_clip import train_clip

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    imgs, caps = [], []
    for i in range(60):
        name = list(colours)[i % 3]
        imgs.append(torch.tensor(colours[name]).view(3, 1, 1).expand(3, 32, 32) / 127.5 - 1)
        caps.append(f"a {name} square")
    folder = tmp_path_factory.mktemp("clip")
    train_clip(folder, torch.stack(imgs).float(), caps, ["a", "square", *colours], steps=60, batch_size=12, seed=0)
    return Clip.load(str(folder)), colours


def test_clip_checksum_is_checked(tiny_clip, tmp_path):
    from controlnet_recipe.metrics.clip import Clip, sha256_file, weights_file

    clip, _ = tiny_clip
    folder = weights_file(clip.model.name_or_path, None).parent
    assert clip.sha256 == sha256_file(folder / "model.safetensors")
    with pytest.raises(ValueError, match="sha256"):
        Clip.load(str(folder), sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="no CLIP weights"):
        Clip.load(str(tmp_path))


def test_clip_score_matches_clips_own_logits_and_zero_shot_works(tiny_clip):
    # torchmetrics' CLIPScore (1.9) cannot read transformers 5's get_image_features output, so the
    # reference is CLIPModel's own forward: logits_per_image / logit_scale is the cosine.
    clip, colours = tiny_clip
    images = torch.stack([torch.tensor(c, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32) for c in colours.values()])
    texts = [f"a {n} square" for n in colours]
    ours = clip.clip_score(images, texts)
    tok = clip.processor.tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=clip.pixel_values(images))
    cos = (out.logits_per_image / clip.model.logit_scale.exp()).diagonal().detach()
    assert ours == pytest.approx((100 * cos.clamp(min=0)).numpy(), abs=1e-3)
    assert clip.zero_shot(images, texts).tolist() == [0, 1, 2]  # it learned the colours
    assert (clip.clip_score(images, texts) > clip.clip_score(images, texts[1:] + texts[:1])).all()


def test_fid_and_kid_through_torchmetrics(tiny_clip):
    clip, colours = tiny_clip
    g = torch.Generator().manual_seed(0)

    def squares(name, n):
        base = torch.tensor(colours[name], dtype=torch.float32).view(1, 3, 1, 1)
        return (base + torch.randn(n, 3, 32, 32, generator=g) * 20).clamp(0, 255).to(torch.uint8)

    feats = clip.feature_module()
    same = fid_kid(squares("red", 40), squares("red", 40), feats)
    other = fid_kid(squares("red", 40), squares("blue", 40), feats)
    assert other["fid"] > 10 * max(same["fid"], 1e-3)
    assert other["kid"] > same["kid"]


def test_scorer_with_dlib_and_a_pinned_clip(tiny_clip, tmp_path):
    """The faces recipe's evaluator (dlib landmarks, a CLIP named in clip.json with its sha256)
    scores a real photo: the face is found, its landmarks redraw a segmentation, a blank image
    counts as a detection failure."""
    from skimage import data as skimage_data

    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.core.storage import write_json
    from controlnet_recipe.evaluation.scorer import Scorer
    from controlnet_recipe.faces.draw import draw_segmentation
    from controlnet_recipe.models.segmenter import CLIP_REF

    from .conftest import ROOT

    clip, _ = tiny_clip
    folder = tmp_path / "evaluator"
    folder.mkdir()
    write_json(folder / CLIP_REF, {"name_or_path": clip.model.name_or_path, "revision": None, "sha256": clip.sha256})
    cfg = load_config(ROOT / "params.yaml", {"recipe": "faces"})
    assert cfg.recipe.evaluator.landmarks == "dlib"
    scorer = Scorer(cfg.recipe, folder)
    photo = Image.fromarray(skimage_data.astronaut()).resize((cfg.recipe.data.resolution,) * 2)
    blank = Image.new("RGB", photo.size, (128, 128, 128))
    found = scorer.reextract.detect([photo, blank])
    assert found[0] is not None and found[0].shape == (68, 2) and found[1] is None
    condition = draw_segmentation([found[0]], photo.size)
    scores = scorer.fidelity([photo, blank], [condition, condition], [found[0], found[0]])
    assert scores["nme"][0] == pytest.approx(0.0, abs=1e-6) and scores["miou"][0] == 1.0
    assert scores["found"].tolist() == [1.0, 0.0] and np.isnan(scores["nme"][1]) and scores["miou"][1] == 0.0
    write_json(folder / CLIP_REF, {"name_or_path": clip.model.name_or_path, "revision": None, "sha256": "f" * 64})
    with pytest.raises(ValueError, match="sha256"):
        Scorer(cfg.recipe, folder)


def test_scorer_for_canny_conditions(tiny_clip, tmp_path):
    """A Canny recipe's fidelity is edge F1 of Canny run again on the image (its extractor, when
    the evaluator stage has made one, adds its own line F1); no face metric or probe applies."""
    import yaml
    from skimage import data as skimage_data

    from controlnet_recipe.conditions.canny import canny
    from controlnet_recipe.core.config import load_config
    from controlnet_recipe.core.storage import write_json
    from controlnet_recipe.evaluation.scorer import Scorer
    from controlnet_recipe.models.segmenter import CLIP_REF

    from .conftest import merge, repo_params

    clip, _ = tiny_clip
    folder = tmp_path / "evaluator"
    folder.mkdir()
    write_json(folder / CLIP_REF, {"name_or_path": clip.model.name_or_path, "revision": None, "sha256": clip.sha256})
    params = repo_params()
    params["demo"] = merge(params["demo"], {"conditions": {"kind": "canny"}, "data": {"resolution": 256}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = load_config(tmp_path / "params.yaml").recipe
    assert r.evaluator.landmarks == "learned"
    scorer = Scorer(r, folder)
    photo = Image.fromarray(skimage_data.astronaut()).resize((256, 256))
    blank = Image.new("RGB", (256, 256), (128, 128, 128))
    edges = canny(photo, r.conditions.canny_low, r.conditions.canny_high)
    scores = scorer.fidelity([photo, blank], [edges, edges], [None, None])
    assert scores["edge_f1"][0] == 1.0 and scores["edge_f1"][1] == 0.0 and scorer.fidelity_key == "edge_f1"
    assert not scorer.about_faces and set(scores) == {"edge_f1"}  # no extractor in this folder
