"""The pixel prompt-fidelity checker, validated on real rendered scenes before it judges generated ones.

Real scenes (JPEG-decoded like training data) with their true prompts must score high; the same scenes with a
wrong colour or position in the prompt, blank backgrounds and noise must score low.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.data.synthetic import COLOURS, POSITIONS, SIZES, SceneObject, render
from pipeline.eval.fidelity import (
    ATTRIBUTES, Measurement, check_image, fidelity_sums, judge, measure, real_sample, result_sums,
    validate_on_real,
)

# (resolution, images per split) and floors measured on exactly these images (seed 0) with margin:
# measured size/shape, heldout | train: 16 px 0.95/0.73 | 0.96/0.77; 32 px 1.00/0.92 | 0.99/0.91;
# 64 px 1.00/0.97 | 0.99/0.99.
REAL_CASES = [(16, 200), (32, 100), (64, 50)]
SIZE_FLOOR = {16: 0.90, 32: 0.94, 64: 0.95}
SHAPE_FLOOR = {16: 0.65, 32: 0.85, 64: 0.90}


def scene(objects: list[SceneObject], resolution: int, seed: int = 0) -> torch.Tensor:
    """Render `objects` (cx, cy, radius in pixels) losslessly: (3, R, R) in [0, 1]."""
    image = render(objects, resolution, np.random.default_rng(seed))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def placed(size: str, colour: str, shape: str, position: str, resolution: int) -> SceneObject:
    """An object drawn exactly at its position anchor with its nominal radius."""
    px, py = POSITIONS[position]
    radius = SIZES[size] * resolution
    return SceneObject(size, colour, shape, position, cx=px * resolution, cy=py * resolution, radius=radius)


def rates(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {a: hits / count for a, (hits, count) in sums.items()}


def judged_sums(measured: list[Measurement], asks: list[list[SceneObject]]) -> dict[str, tuple[float, float]]:
    """`fidelity_sums` for images measured once and judged against several prompts."""
    return result_sums([judge(m, objects) for m, objects in zip(measured, asks)])


RealScenes = dict[tuple[int, str], list[tuple[torch.Tensor, list[SceneObject], Measurement]]]


@pytest.fixture(scope="module")
def real_scenes() -> RealScenes:
    """(resolution, split) -> [(image, true objects, measurement)]: each image is measured once."""
    out: RealScenes = {}
    for res, n in REAL_CASES:
        for split in ("heldout", "train"):
            pairs = [real_sample(i, 0, split, res) for i in range(n)]
            out[(res, split)] = [(image, objects, measure(image)) for image, objects in pairs]
    return out


@pytest.mark.parametrize("split", ["heldout", "train"])
@pytest.mark.parametrize("resolution", [res for res, _ in REAL_CASES])
def test_real_scenes_with_true_prompts_score_high(real_scenes, resolution, split):
    scenes = real_scenes[(resolution, split)]
    acc = rates(judged_sums([m for _, _, m in scenes], [objects for _, objects, _ in scenes]))
    print(f"{split} {resolution}px true prompts: " + ", ".join(f"{a} {v:.3f}" for a, v in acc.items()))
    assert acc["colour"] >= 0.95 and acc["position"] >= 0.95, acc
    assert acc["size"] >= SIZE_FLOOR[resolution] and acc["shape"] >= SHAPE_FLOOR[resolution], acc


def absent_colour(objects: list[SceneObject], shift: int) -> str:
    """A palette colour that no object of the scene has (deterministic)."""
    free = [c for c in COLOURS if c not in {o.colour for o in objects}]
    return free[shift % len(free)]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_wrong_colour_or_position_in_prompt_scores_low(real_scenes, resolution):
    scenes = real_scenes[(resolution, "heldout")]
    measured = [m for _, _, m in scenes]
    wrong_colour = [[replace(o, colour=absent_colour(objs, i + k)) for k, o in enumerate(objs)]
                    for i, (_, objs, _) in enumerate(scenes)]
    wrong_position = []
    for _, objs, _ in scenes:  # move every object to a position no object of the scene occupies
        free = [p for p in POSITIONS if p not in {o.position for o in objs}]
        wrong_position.append([replace(o, position=free[k]) for k, o in enumerate(objs)])
    shuffled = [scenes[(i + 7) % len(scenes)][1] for i in range(len(scenes))]
    colour_acc = rates(judged_sums(measured, wrong_colour))
    position_acc = rates(judged_sums(measured, wrong_position))
    shuffled_acc = rates(judged_sums(measured, shuffled))
    print(f"{resolution}px wrong colour {colour_acc}, wrong position {position_acc}, shuffled {shuffled_acc}")
    assert colour_acc["colour"] <= 0.05 and colour_acc["position"] <= 0.05
    assert position_acc["colour"] >= 0.95 and position_acc["position"] <= 0.05
    assert shuffled_acc["colour"] < 0.3 and shuffled_acc["position"] < 0.2


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_blank_background_has_no_colour_hits(resolution):
    asks = [[placed("large", colour, "circle", "center", resolution)] for colour in COLOURS]
    images = [scene([], resolution, seed) for seed in range(len(asks))]
    assert all(not measure(image).blobs and not measure(image).rejected for image in images)
    assert fidelity_sums(images, asks)["colour"] == (0.0, float(len(COLOURS)))


@pytest.mark.parametrize("resolution", [16, 64])
def test_noise_is_rejected(resolution):
    generator = torch.Generator().manual_seed(0)
    ask = [placed("large", "red", "circle", "left", resolution),
           placed("small", "white", "square", "right", resolution)]
    uniform = torch.rand(4, 3, resolution, resolution, generator=generator)
    gaussian = (0.5 + 0.25 * torch.randn(4, 3, resolution, resolution, generator=generator)).clamp(0, 1)
    smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4, generator=generator), size=resolution,
                                             mode="bilinear")
    for image in torch.cat([uniform, gaussian, smooth]):
        result = check_image(image, ask)
        assert result.rejected and not any(result.colour) and not any(result.position)


def test_every_attribute_on_drawn_scenes():
    res = 64
    for shape in ("circle", "square", "triangle"):
        for size, colour, position in [("large", "red", "left"), ("small", "white", "top"), ("small", "blue", "center"),
                                       ("large", "purple", "bottom"), ("small", "green", "right")]:
            obj = placed(size, colour, shape, position, res)
            result = check_image(scene([obj], res), [obj])
            assert result.as_dict() == {a: [True] for a in ATTRIBUTES}, (obj, result)
            flipped = replace(obj, size="small" if size == "large" else "large")
            assert check_image(scene([obj], res), [flipped]).size == [False]


def test_two_objects_of_one_colour_are_told_apart():
    res = 32
    objects = [placed("large", "cyan", "circle", "left", res), placed("small", "cyan", "square", "right", res)]
    image = scene(objects, res)
    assert check_image(image, objects).as_dict() == {a: [True, True] for a in ATTRIBUTES}
    # Same-coloured objects are paired with blobs by position, so swapped positions fail on size and shape.
    swapped = [replace(objects[0], position="right"), replace(objects[1], position="left")]
    assert check_image(image, swapped).as_dict() == {"colour": [True, True], "position": [True, True],
                                                     "size": [False, False], "shape": [False, False]}
    # Asking for a second object that is not drawn: one colour hit only, never two for one blob.
    single = scene(objects[:1], res)
    assert check_image(single, objects).colour.count(True) == 1


def test_missing_colour_is_a_miss_on_every_attribute():
    res = 32
    drawn = placed("large", "yellow", "square", "top", res)
    asked = [drawn, placed("small", "orange", "triangle", "bottom", res)]
    result = check_image(scene([drawn], res), asked)
    assert result.as_dict() == {a: [True, False] for a in ATTRIBUTES}
    assert fidelity_sums(scene([drawn], res)[None], [asked]) == {a: (1.0, 2.0) for a in ATTRIBUTES}


def test_sums_add_up_across_batches_and_inputs_are_checked(real_scenes):
    scenes = real_scenes[(32, "train")][:12]
    batch = torch.stack([image for image, _, _ in scenes])
    objects = [objs for _, objs, _ in scenes]
    whole = fidelity_sums(batch, objects)
    assert whole == judged_sums([m for _, _, m in scenes], objects)
    halves = [fidelity_sums(batch[:5], objects[:5]), fidelity_sums(list(batch[5:]), objects[5:])]
    assert whole == {a: (halves[0][a][0] + halves[1][a][0], halves[0][a][1] + halves[1][a][1]) for a in ATTRIBUTES}
    assert whole["colour"][1] == sum(len(o) for o in objects)
    with pytest.raises(ValueError, match="float"):
        check_image((batch[0] * 255).to(torch.uint8), objects[0])
    with pytest.raises(ValueError, match="at least 8 px"):
        check_image(batch[0][:, :, :7], objects[0])
    with pytest.raises(ValueError, match="colour 'pink'"):
        check_image(batch[0], [replace(objects[0][0], colour="pink")])
    with pytest.raises(ValueError, match="object lists"):
        fidelity_sums(batch, objects[:3])


def test_validate_on_real_reports_every_attribute():
    acc = validate_on_real(20, 32, split="heldout")
    assert set(acc) == set(ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["colour"] >= 0.9


@pytest.mark.parametrize("aspect", [(16, 9), (9, 16), (4, 3), (1, 2)])
def test_non_square_scenes_are_judged_like_square_ones(aspect):
    """Rendered wide and tall scenes (JPEG, 32 px area) with their true prompts score like squares; moving each
    object's position word to the opposite side makes position a miss (measured: colour/position/size 1.0,
    shape 0.92-0.97 on 60 scenes per shape)."""
    pairs = [real_sample(i, 0, "heldout", 32, "jpg", (aspect,)) for i in range(30)]
    assert all(image.shape[1:] != (32, 32) for image, _ in pairs)
    measured = [measure(image) for image, _ in pairs]
    true = rates(judged_sums(measured, [objects for _, objects in pairs]))
    assert true["colour"] >= 0.97 and true["position"] >= 0.97 and true["size"] >= 0.93 and true["shape"] >= 0.8
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}
    moved = rates(judged_sums(measured, [[replace(o, position=opposite[o.position]) for o in objects]
                                         for _, objects in pairs]))
    assert moved["colour"] >= 0.97 and moved["position"] <= 0.1
