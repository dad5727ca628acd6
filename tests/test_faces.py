"""The synthetic generator, the part geometry and the segmentation drawing."""

from __future__ import annotations

import numpy as np

from controlnet_recipe.faces.draw import PALETTE, PARTS, draw_label_map, draw_segmentation, labels_from_segmentation
from controlnet_recipe.faces.synthetic import CAPTION_WORDS, FaceAttributes, describe, make_face


def test_deterministic_from_seed():
    a_img, a_lm, a_attr = make_face(7, 64)
    b_img, b_lm, b_attr = make_face(7, 64)
    c_img, _, _ = make_face(8, 64)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    assert np.array_equal(a_lm, b_lm) and a_attr == b_attr
    assert not np.array_equal(np.asarray(a_img), np.asarray(c_img))


def test_landmarks_layout_and_placement():
    for seed in range(20):
        img, lm, _ = make_face(seed, 64)
        assert img.size == (64, 64) and img.mode == "RGB"
        assert lm.shape == (68, 2)
        centre = lm.mean(0)
        assert (centre > 0).all() and (centre < 64).all()
        # iBUG layout: the subject's right eye (36-41) is left of the left eye (42-47) for upright faces.
        right_eye, left_eye = lm[36:42].mean(0), lm[42:48].mean(0)
        assert np.linalg.norm(right_eye - left_eye) > 3
        # The chin (8) is below the nose tip (30) in the face's own frame.
        up = lm[27] - lm[8]
        assert np.dot(lm[30] - lm[8], up) > 0


def test_expression_attributes_change_geometry():
    rng_attrs = dict(
        skin="tan",
        hair="black",
        background="blue",
        eye_colour="brown",
        smiling=False,
        brows_raised=False,
        bald=False,
        roll_deg=0.0,
        yaw=0.0,
        scale=0.7,
    )
    from controlnet_recipe.faces.synthetic import canonical_landmarks

    closed = canonical_landmarks(np.random.default_rng(0), FaceAttributes(mouth_open=False, eyes_closed=False, **rng_attrs))
    opened = canonical_landmarks(np.random.default_rng(0), FaceAttributes(mouth_open=True, eyes_closed=True, **rng_attrs))
    gap = lambda lm: lm[66, 1] - lm[62, 1]  # inner lower lip minus inner upper lip
    eye = lambda lm: lm[41, 1] - lm[37, 1]
    assert gap(opened) > gap(closed) + 0.05
    assert eye(opened) < eye(closed)


def test_segmentation_uses_palette_and_inverts_exactly():
    _, lm, _ = make_face(3, 64)
    labels = draw_label_map([lm], (64, 64))
    seg = np.asarray(draw_segmentation([lm], (64, 64)))
    colours = {tuple(c) for c in seg.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in PALETTE}
    assert np.array_equal(labels_from_segmentation(seg), labels)
    present = set(np.unique(labels))
    assert {PARTS.index("skin"), PARTS.index("nose"), PARTS.index("upper_lip")} <= present
    assert 0 in present  # background around the face


def test_two_faces_in_one_map():
    _, lm, _ = make_face(1, 128)
    shifted = lm * 0.4
    both = draw_label_map([shifted, shifted + 70], (128, 128))
    one = draw_label_map([shifted], (128, 128))
    assert (both > 0).sum() > (one > 0).sum() * 1.8


def test_captions_use_known_words():
    for seed in range(30):
        _, _, attrs = make_face(seed, 32)
        text = describe(attrs)
        assert text.startswith("a face with ")
        words = text.replace(",", " ").split()
        assert set(words) <= set(CAPTION_WORDS)
