"""The gallery's choice of images: missed objects of rare classes first."""

import torch


def test_gallery_shows_the_missed_rare_objects_first():
    from visualize import _miss_score

    def gt(labels, boxes):
        return {"labels": torch.tensor(labels), "boxes": torch.tensor(boxes, dtype=torch.float32)}

    nothing = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
    found = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0, 10, 10]]), "scores": torch.tensor([0.9])}
    rarity = {1: 1 / 50, 2: 1 / 2}
    common_missed = _miss_score(gt([1], [[0, 0, 10, 10]]), nothing, 0.05, rarity)
    rare_missed = _miss_score(gt([2], [[0, 0, 10, 10]]), nothing, 0.05, rarity)
    common_found = _miss_score(gt([1], [[0, 0, 10, 10]]), found, 0.05, rarity)
    assert rare_missed > common_missed > common_found == 0.0
