"""The long-tail classifiers (sigmoid, federated, Seesaw, EQLv2) against their peers' formulas, written
out here in the peers' own layouts (Detectron2: background logit last; MMDetection: classes, then the
objectness pair / background channel), and the classification-loss registry they share with CE and focal."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import fastrcnn_loss

import tv_lossfix
from tv_lossfix import cls_losses as C
from tv_lossfix.classifiers import NormedLinear, SeesawPredictor
from tv_lossfix.config import LossConfig, LossConfigError

from helpers import assert_scripted_matches_eager, make_targets, on_gloo_ranks, run_losses, tiny_model

K = 6  # foreground classes
EPS32 = torch.finfo(torch.float32).eps


def batch(n=40, k=K, seed=0, scale=3.0, extra=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k + 1 + extra, generator=g, dtype=torch.float64) * scale).requires_grad_()
    labels = torch.randint(0, k + 1, (n,), generator=g)
    labels[:3] = torch.tensor([0, 1, k])  # background, a class and the last class present
    return logits, labels


def to_peer_labels(labels, k=K):
    """Our labels (0 background, 1..K) as the peers': classes 0..K-1, background K."""
    return torch.where(labels > 0, labels - 1, torch.full_like(labels, k))


def bg_last(logits):
    """Our [bg, 1..K] logits in the peers' order [0..K-1, bg]."""
    return torch.cat([logits[:, 1:], logits[:, :1]], dim=1)


def grads(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# -- Detectron2: sigmoid cross-entropy and the federated loss ---------------------------------------
def d2_sigmoid_ce(pred, gt, fed_classes=None):
    """Detectron2 FastRCNNOutputLayers.sigmoid_cross_entropy_loss (background logit last)."""
    n, k = pred.shape[0], pred.shape[1] - 1
    target = pred.new_zeros(n, k + 1)
    target[range(n), gt] = 1
    target = target[:, :k]
    loss = F.binary_cross_entropy_with_logits(pred[:, :-1], target, reduction="none")
    weight = 1
    if fed_classes is not None:
        mask = fed_classes.new_zeros(k + 1)
        mask[fed_classes] = 1
        weight = mask[:k].view(1, k).expand(n, k).float()
    return torch.sum(loss * weight) / n


def d2_fed_classes(gt, num_fed, k, weight):
    """Detectron2 get_fed_loss_classes."""
    unique = torch.unique(gt)
    prob = unique.new_ones(k + 1).float()
    prob[-1] = 0
    if len(unique) < num_fed:
        prob[:k] = weight.float().clone()
        prob[unique] = 0
        drawn = torch.multinomial(prob, num_fed - len(unique), replacement=False)
        return torch.cat([unique, drawn])
    return unique


def test_sigmoid_ce_equals_detectron2_values_and_gradients():
    logits, labels = batch()
    ours = grads(lambda x: C.sigmoid_ce_loss(x, labels), logits)
    peer = grads(lambda x: d2_sigmoid_ce(bg_last(x), to_peer_labels(labels)), logits)
    assert_same(ours[0], peer[0])
    assert_same(ours[1], peer[1])
    assert torch.equal(ours[1][:, 0], torch.zeros(len(labels), dtype=ours[1].dtype))  # background logit unused


@pytest.mark.parametrize("num_fed", [4, 5, 20])
def test_federated_draws_detectron2s_classes_and_loss(num_fed):
    k = 30
    counts = [int(c) for c in torch.randint(0, 200, (k,), generator=torch.Generator().manual_seed(3))]
    counts[4] = 0  # a class without image is never drawn
    weight = C.fed_class_weights(counts, 0.5)
    assert torch.equal(weight, torch.tensor(counts, dtype=torch.float32) ** 0.5)  # get_fed_loss_cls_weights
    logits, labels = batch(n=64, k=k, seed=1)
    labels = torch.where(labels > 6, torch.zeros_like(labels), labels)  # classes 1..6 present, with background
    peer_labels = to_peer_labels(labels, k)
    for seed in range(5):
        torch.manual_seed(seed)
        peer_set = d2_fed_classes(peer_labels, num_fed, k, weight)
        torch.manual_seed(seed)
        mask = C.federated_classes(labels, weight, num_fed)
        expected = torch.zeros(k + 1)
        expected[peer_set] = 1
        # ours: [bg, 1..K] (bg 0); Detectron2's: [0..K-1, bg]
        assert torch.equal(mask[1:], expected[:k]) and mask[0] == 0
        want = min(num_fed, k + 1) - 1  # foreground classes kept (the background counts towards num_fed)
        assert int(mask.sum()) == max(want, 6)
        ours = grads(lambda x, m=mask: C.sigmoid_ce_loss(x, labels, class_mask=m), logits)
        peer = grads(lambda x, s=peer_set: d2_sigmoid_ce(bg_last(x), peer_labels, s), logits)
        assert_same(ours[0], peer[0])
        assert_same(ours[1], peer[1])


def test_federated_with_fewer_classes_than_fed_num_classes_keeps_every_class_with_images():
    # Detectron2's torch.multinomial raises here (more samples than classes); ours keeps all of them.
    weight = C.fed_class_weights([3, 0, 8, 1], 0.5)
    mask = C.federated_classes(torch.tensor([0, 2, 0]), weight, 50)
    assert mask.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]  # class 2 (no image) kept: it is in the batch
    assert C.federated_classes(torch.tensor([0, 0]), weight, 50).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]


def test_federated_draw_is_proportional_to_the_weights():
    # Many draws: inclusion frequency of the negatives follows torch.multinomial's (Detectron2's) draw.
    weight = torch.tensor([1.0, 4.0, 9.0, 16.0, 0.0, 25.0])
    labels = torch.tensor([0, 1, 1])  # class 1 present; 2 negatives to draw (num_fed 4 - class 1 - background)
    torch.manual_seed(0)
    ours = torch.stack([C.federated_classes(labels, weight, 4) for _ in range(4000)]).mean(0)
    torch.manual_seed(0)
    peer = torch.zeros(7)
    for _ in range(4000):
        s = d2_fed_classes(to_peer_labels(labels), 4, 6, weight)
        peer[s] += 1
    peer = torch.cat([torch.zeros(1), peer[:6]]) / 4000
    assert torch.equal(ours, peer)  # the same draws, not only the same distribution
    assert ours[5] == 0 and ours[1] == 1


# -- MMDetection 3.3.0: SeesawLoss ----------------------------------------------------------------
def mm_seesaw_ce(cls_score, labels, label_weights, cum_samples, num_classes, p, q, eps, avg_factor):
    onehot = F.one_hot(labels, num_classes)
    w = cls_score.new_ones(onehot.size())
    if p > 0:
        ratio = cum_samples[None, :].clamp(min=1) / cum_samples[:, None].clamp(min=1)
        index = (ratio < 1.0).float()
        w = w * (ratio.pow(p) * index + (1 - index))[labels.long(), :]
    if q > 0:
        scores = F.softmax(cls_score.detach(), dim=1)
        own = scores[torch.arange(0, len(scores)).long(), labels.long()]
        m = scores / own[:, None].clamp(min=eps)
        index = (m > 1.0).float()
        w = w * (m.pow(q) * index + (1 - index))
    cls_score = cls_score + (w.log() * (1 - onehot))
    loss = F.cross_entropy(cls_score, labels, reduction="none")
    return (loss * label_weights.float()).sum() / (avg_factor + EPS32)


def mm_seesaw(cls_score, labels, label_weights, cum_samples, num_classes, p=0.8, q=2.0, eps=1e-2, avg_factor=None):
    """SeesawLoss.forward (return_dict=False); updates ``cum_samples`` in place as MMDetection does."""
    pos = labels < num_classes
    obj_labels = (labels == num_classes).long()
    for u in labels.unique():
        cum_samples[u] += (labels == u.item()).sum()
    classes, objectness = cls_score[..., :-2], cls_score[..., -2:]
    if pos.sum() > 0:
        loss_classes = mm_seesaw_ce(
            classes[pos], labels[pos], label_weights[pos], cum_samples[:num_classes], num_classes, p, q, eps, avg_factor
        )
    else:
        loss_classes = classes[pos].sum()
    loss_obj = (F.cross_entropy(objectness, obj_labels, reduction="none") * label_weights).sum() / (avg_factor + EPS32)
    return loss_classes + loss_obj


def mm_seesaw_activation(cls_score):
    classes, objectness = cls_score[..., :-2], cls_score[..., -2:]
    obj = F.softmax(objectness, dim=-1)
    return torch.cat([F.softmax(classes, dim=-1) * obj[..., [0]], obj[..., [1]]], dim=-1)


def seesaw_to_peer(logits):
    """Our [bg, 1..K, object] as MMDetection's [0..K-1, object, background]."""
    return torch.cat([logits[:, 1:-1], logits[:, -1:], logits[:, :1]], dim=1)


@pytest.mark.parametrize("p,q", [(0.8, 2.0), (0.0, 2.0), (0.8, 0.0)])
def test_seesaw_equals_mmdetection_values_gradients_and_counts(p, q):
    logits, labels = batch(n=48, extra=1, seed=2)
    w = torch.rand(48, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5
    avg = torch.tensor(48.0, dtype=torch.float64)
    crit = C.Seesaw(K + 1, p, q).double()
    crit.cum_samples += torch.tensor([300.0, 50, 2, 0, 900, 7, 1], dtype=torch.float64)
    peer_counts = torch.cat([crit.cum_samples[1:], crit.cum_samples[:1]]).clone()
    for _ in range(2):  # the second step sees the counts the first one added
        before = crit.cum_samples.clone()
        ours = grads(lambda x: crit(x, labels, avg, w), logits)
        crit.cum_samples.copy_(before)  # grads() ran the criterion once; count each step once below
        crit(logits.detach(), labels, avg, w)
        peer_before = peer_counts.clone()
        peer = grads(
            lambda x: mm_seesaw(seesaw_to_peer(x), to_peer_labels(labels), w, peer_counts, K, p, q, avg_factor=48.0),
            logits,
        )
        peer_counts.copy_(peer_before)
        mm_seesaw(seesaw_to_peer(logits.detach()), to_peer_labels(labels), w, peer_counts, K, p, q, avg_factor=48.0)
        assert_same(ours[0], peer[0])
        assert_same(ours[1], peer[1])
        assert torch.equal(torch.cat([crit.cum_samples[1:], crit.cum_samples[:1]]), peer_counts)
    labels_pos = torch.bincount(labels, minlength=K + 1).double()
    assert torch.equal(
        crit.cum_samples - torch.tensor([300.0, 50, 2, 0, 900, 7, 1], dtype=torch.float64), 2 * labels_pos
    )


def test_seesaw_counts_past_float32s_integer_range_grow_by_the_batch_count():
    # MMDetection adds each class's batch count (cum_samples[u] += (labels == u).sum()): a count at
    # 2 ** 24 still grows by 4 (16777220 is a float32); one +1 per sample would leave it at 2 ** 24.
    crit = C.Seesaw(K + 1, 0.8, 2.0)
    crit.cum_samples[2] = 2.0**24
    logits, _ = batch(n=6, extra=1)
    labels = torch.tensor([2, 2, 0, 2, 2, 5])
    peer = torch.cat([crit.cum_samples[1:], crit.cum_samples[:1]]).clone()
    for u in to_peer_labels(labels).unique():
        peer[u] += (to_peer_labels(labels) == u.item()).sum()
    crit(logits.detach().float(), labels, None, None)
    assert crit.cum_samples[2] == 2.0**24 + 4
    assert torch.equal(torch.cat([crit.cum_samples[1:], crit.cum_samples[:1]]), peer)


def test_seesaw_scores_are_mmdetections_activation():
    logits, _ = batch(extra=1)
    ours = C.seesaw_scores(logits.detach())
    peer = mm_seesaw_activation(seesaw_to_peer(logits.detach()))
    assert_same(ours, torch.cat([peer[:, -1:], peer[:, :-1]], dim=1))
    assert_same(ours.sum(1), torch.ones(len(ours), dtype=ours.dtype))


# -- MMDetection 3.3.0: EQLV2Loss --------------------------------------------------------------------
class MMEQLv2:
    """EQLV2Loss (mu, alpha, gamma; buffers pos_grad, neg_grad, pos_neg = 100 at start)."""

    def __init__(self, k, mu=0.8, alpha=4.0, gamma=12.0):
        self.mu, self.alpha, self.gamma = mu, alpha, gamma
        self.pos_grad = torch.zeros(k, dtype=torch.float64)
        self.neg_grad = torch.zeros(k, dtype=torch.float64)
        self.pos_neg = torch.ones(k, dtype=torch.float64) * 100

    def map(self, x):
        return 1 / (1 + torch.exp(-self.gamma * (x - self.mu)))

    def weights(self, pred):
        n_i, n_c = pred.size()
        neg_w = torch.cat([self.map(self.pos_neg), pred.new_ones(1)])
        pos_w = 1 + self.alpha * (1 - neg_w)
        return pos_w.view(1, -1).expand(n_i, n_c), neg_w.view(1, -1).expand(n_i, n_c)

    def loss(self, pred, label):
        n_i, n_c = pred.size()
        target = pred.new_zeros(n_i, n_c)
        target[torch.arange(n_i), label] = 1
        pos_w, neg_w = self.weights(pred)
        weight = pos_w * target + neg_w * (1 - target)
        loss = torch.sum(F.binary_cross_entropy_with_logits(pred, target, reduction="none") * weight) / n_i
        return loss, target, weight

    def collect(self, pred, target, weight):
        prob = torch.sigmoid(pred)
        grad = torch.abs(target * (prob - 1) + (1 - target) * prob)
        self.pos_grad += torch.sum(grad * target * weight, dim=0)[:-1]
        self.neg_grad += torch.sum(grad * (1 - target) * weight, dim=0)[:-1]
        self.pos_neg = self.pos_grad / (self.neg_grad + 1e-10)

    def activation(self, pred):
        pred = torch.sigmoid(pred)
        bg = pred[:, -1].view(-1, 1)
        pred[:, :-1] *= 1 - bg
        return pred


def test_eqlv2_equals_mmdetection_over_steps():
    crit = C.EQLv2(K + 1, 0.8, 4.0, 12.0).double()
    peer = MMEQLv2(K)
    for step in range(3):
        logits, labels = batch(n=50, seed=10 + step)
        peer_labels = to_peer_labels(labels)
        state = {k: v.clone() for k, v in crit.state_dict().items()}
        ours = grads(lambda x, y=labels: crit(x, y, None, None), logits)
        crit.load_state_dict(state)
        crit(logits.detach(), labels, None, None)  # one statistics update per step
        theirs = grads(lambda x, y=peer_labels: peer.loss(bg_last(x), y)[0], logits)
        _, target, weight = peer.loss(bg_last(logits.detach()), peer_labels)
        peer.collect(bg_last(logits.detach()), target, weight)
        assert_same(ours[0], theirs[0])
        assert_same(ours[1], theirs[1])
        assert_same(crit.pos_grad, peer.pos_grad)
        assert_same(crit.neg_grad, peer.neg_grad)
        assert_same(crit.pos_neg, peer.pos_neg)
    assert not torch.allclose(crit.pos_neg, torch.full_like(crit.pos_neg, 100.0))  # the weights moved
    scores = C.eqlv2_scores(logits.detach())
    assert_same(bg_last(scores), peer.activation(bg_last(logits.detach())))


def _eqlv2_on_rank(rank):
    torch.manual_seed(rank)
    crit = C.EQLv2(K + 1, 0.8, 4.0, 12.0)
    logits, labels = torch.randn(30, K + 1), torch.randint(0, K + 1, (30,))
    crit(logits, labels, None, None)
    pos, neg = C.eqlv2_grad_stats(logits, labels, torch.full((K,), 100.0), 0.8, 4.0, 12.0)
    return {
        "pos_grad": crit.pos_grad.tolist(),
        "own_pos": pos.tolist(),
        "own_neg": neg.tolist(),
        "neg": crit.neg_grad.tolist(),
    }


def test_eqlv2_statistics_are_summed_over_two_gloo_ranks():
    out = on_gloo_ranks(_eqlv2_on_rank)
    assert out[(0, "pos_grad")] == out[(1, "pos_grad")]
    summed = torch.tensor(out[(0, "own_pos")]) + torch.tensor(out[(1, "own_pos")])
    torch.testing.assert_close(torch.tensor(out[(0, "pos_grad")]), summed)
    torch.testing.assert_close(
        torch.tensor(out[(1, "neg")]), torch.tensor(out[(0, "own_neg")]) + torch.tensor(out[(1, "own_neg")])
    )


# -- the registry and the heads ------------------------------------------------------------------------
def test_ce_through_the_registry_is_torchvisions_fastrcnn_loss_bit_for_bit():
    model = tiny_model("faster", loss_cfg={})
    assert type(model.roi_heads.cls_criterion) is C.CrossEntropy
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 3, (64,), generator=g) for _ in range(2)]
    targets = [torch.randn(64, 4, generator=g) for _ in range(2)]
    proposals = [torch.rand(64, 4, generator=g) for _ in range(2)]
    logits, box = torch.randn(128, 3, requires_grad=True), torch.randn(128, 12, requires_grad=True)
    ours = model.roi_heads.box_losses(logits, box, labels, targets, proposals)
    stock = fastrcnn_loss(logits, box, labels, targets)
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])
    g1 = torch.autograd.grad(ours[0], logits)[0]
    g2 = torch.autograd.grad(stock[0], logits)[0]
    assert torch.equal(g1, g2)


def test_registry_names_and_refusals():
    assert C.cls_loss_names("roi_head") == ("ce", "focal", "sigmoid", "federated", "seesaw", "eqlv2")
    assert C.cls_loss_names("rpn_head") == ("bce", "focal")
    with pytest.raises(ValueError, match="already registered"):
        C.register(C.ClsLoss("seesaw", "roi_head", lambda s, n: C.CrossEntropy()))


LONG_TAIL = {
    "sigmoid": {"cls_loss": "sigmoid"},
    "federated": {"cls_loss": "federated", "fed_image_counts": [5, 1], "fed_num_classes": 2},
    "seesaw": {"cls_loss": "seesaw", "seesaw_p": 0.5},
    "eqlv2": {"cls_loss": "eqlv2", "eqlv2_gamma": 10},
    "cosine": {"cls_loss": "seesaw", "cosine_classifier": True},
}


@pytest.mark.parametrize("name", list(LONG_TAIL))
def test_each_loss_from_dict_yaml_and_builder(name, tmp_path):
    roi = LONG_TAIL[name]
    cfg = LossConfig.from_dict({"roi_head": roi})
    path = tmp_path / "loss.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"model": {"roi_head": roi}}))
    assert LossConfig.from_yaml(path) == cfg
    model, report = tv_lossfix.builders.build_with_report(
        "fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None, num_classes=3, loss_cfg=cfg
    )
    assert model.roi_heads.cls_loss == roi["cls_loss"]
    if roi["cls_loss"] == "seesaw":
        assert isinstance(model.roi_heads.box_predictor, SeesawPredictor)
        assert any("cls_objectness" in line for line in report.replaced)
        assert "roi_heads.cls_criterion.cum_samples" in model.state_dict()
    if roi.get("cosine_classifier"):
        assert isinstance(model.roi_heads.box_predictor.cls_score, NormedLinear)
        assert any("NormedLinear" in line for line in report.replaced)


@pytest.mark.parametrize(
    "roi,message",
    [
        ({"seesaw_p": 0.5}, "roi_head.seesaw_p is set .* but roi_head.cls_loss is 'ce': .* seesaw"),
        (
            {"cls_loss": "sigmoid", "fed_num_classes": 3},
            "roi_head.fed_num_classes .* only with roi_head.cls_loss: federated",
        ),
        ({"cls_loss": "eqlv2", "eqlv2_mu": -1}, "roi_head.eqlv2_mu must be a finite number >= 0"),
        ({"cls_loss": "federated", "fed_num_classes": 0}, "roi_head.fed_num_classes must be an integer >= 1"),
        ({"cls_loss": "federated", "fed_image_counts": [1, -2]}, r"roi_head.fed_image_counts\[1\]"),
        (
            {"cls_loss": "federated", "fed_image_counts": "auto"},
            "fed_image_counts 'auto' is resolved by references/train.py",
        ),
        ({"cosine_temperature": 10}, "roi_head.cosine_temperature is set"),
        ({"cls_loss": "seesaws"}, "roi_head.cls_loss must be one of .*did you mean 'seesaw'"),
    ],
)
def test_long_tail_config_errors(roi, message):
    with pytest.raises(LossConfigError, match=message):
        LossConfig.from_dict({"roi_head": roi})


def test_rpn_refuses_roi_only_loss_keys():
    with pytest.raises(LossConfigError, match="'rpn_head.seesaw_p': it is a roi_head key only"):
        LossConfig.from_dict({"rpn_head": {"seesaw_p": 0.5}})


def test_federated_needs_counts_of_the_models_classes():
    with pytest.raises(LossConfigError, match="roi_head.cls_loss federated needs roi_head.fed_image_counts"):
        tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "federated"}})
    with pytest.raises(LossConfigError, match="fed_image_counts has 3 entries but the model has 2 foreground"):
        tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "federated", "fed_image_counts": [1, 2, 3]}})


def test_normed_linear_by_hand():
    layer = NormedLinear(5, 3, temperature=20.0)
    x = torch.randn(4, 5)
    w = layer.weight
    want = 20.0 * (x / (x.norm(dim=1, keepdim=True) + 1e-6)) @ (w / (w.norm(dim=1, keepdim=True) + 1e-6)).T + layer.bias
    assert_same(layer(x), want)


def test_seesaw_cosine_classifier_is_one_normed_layer_over_all_its_outputs():
    # MMDetection: cls_predictor_cfg NormedLinear builds fc_cls with SeesawLoss's C + 2 outputs, so the
    # objectness logits are cosine logits too (configs/seesaw_loss/*.py).
    model = tiny_model("faster", loss_cfg={"roi_head": LONG_TAIL["cosine"]})
    pred = model.roi_heads.box_predictor
    assert isinstance(pred.cls_score, NormedLinear) and isinstance(pred.cls_objectness, NormedLinear)
    x = torch.randn(7, pred.cls_score.in_features)
    w = torch.cat([pred.cls_score.weight, pred.cls_objectness.weight])
    b = torch.cat([pred.cls_score.bias, pred.cls_objectness.bias])
    want = 20.0 * (x / (x.norm(dim=1, keepdim=True) + 1e-6)) @ (w / (w.norm(dim=1, keepdim=True) + 1e-6)).T + b
    with torch.no_grad():
        assert_same(pred(x)[0], want)
    tv_lossfix.patch_model(model, {"roi_head": {"cls_loss": "seesaw"}})  # cosine off: both back to Linear
    assert type(pred.cls_score) is torch.nn.Linear and type(pred.cls_objectness) is torch.nn.Linear


@pytest.mark.parametrize("name", ["sigmoid", "federated", "seesaw", "eqlv2"])
def test_training_and_inference_through_the_model(name):
    model = tiny_model("mask", loss_cfg={"roi_head": LONG_TAIL[name]})
    images, targets = make_targets("mask", [(64, 64), (64, 80)], empty=(1,))
    losses = run_losses(model, images, targets)
    assert torch.isfinite(losses["loss_classifier"]) and losses["loss_classifier"] > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    stats = tv_lossfix.training_stats(model)
    assert 0 <= stats["roi/fg_prob"] <= 1
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(images)
    assert model.roi_heads.softmax_scores is False  # the loss's own activation (postprocess_scores)
    for det in out:
        assert det["scores"].numel() > 0 and (det["labels"] >= 1).all() and (det["labels"] <= 2).all()
        assert ((det["scores"] > 0) & (det["scores"] <= 1)).all()


def test_softmax_scores_postprocess_is_torchvisions():
    model = tiny_model("faster", loss_cfg={})
    heads = model.roi_heads
    heads.score_thresh = 0.0
    g = torch.Generator().manual_seed(0)
    logits, box = torch.randn(60, 3, generator=g), torch.randn(60, 12, generator=g)
    proposals = [
        torch.cat([xy := torch.rand(30, 2, generator=g) * 50, xy + 5 + torch.rand(30, 2, generator=g) * 20], 1)
        for _ in range(2)
    ]
    a = heads.postprocess_detections(logits, box, proposals, [(80, 80), (80, 80)])
    b = heads.postprocess_scores(F.softmax(logits, -1), box, proposals, [(80, 80), (80, 80)])
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


def test_stateful_statistics_are_in_the_state_dict_and_survive_a_reload():
    cfg = {"roi_head": {"cls_loss": "seesaw"}}
    model = tiny_model("faster", loss_cfg=cfg)
    images, targets = make_targets("faster", [(64, 64), (64, 80)])
    run_losses(model, images, targets)
    counts = model.roi_heads.cls_criterion.cum_samples.clone()
    assert counts.sum() == 2 * 64  # every sampled RoI of the two images counted once
    fresh = tiny_model("faster", loss_cfg=cfg, seed=1)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.roi_heads.cls_criterion.cum_samples, counts)
    tv_lossfix.patch_model(fresh, {"roi_head": {"cls_loss": "seesaw", "seesaw_q": 1.0}})  # config again: kept
    assert torch.equal(fresh.roi_heads.cls_criterion.cum_samples, counts)


@pytest.mark.parametrize("name", ["sigmoid", "seesaw", "cosine"])
def test_scripted_long_tail_model_matches_eager(name):
    model = tiny_model("faster", loss_cfg={"roi_head": LONG_TAIL[name]})
    scripted = torch.jit.script(copy.deepcopy(model))
    images, targets = make_targets("faster", [(64, 64), (64, 80)])
    assert_scripted_matches_eager(model, scripted, images, targets)


def test_scripted_eqlv2_infers_and_refuses_training_in_one_line():
    model = tiny_model("faster", loss_cfg={"roi_head": {"cls_loss": "eqlv2"}})
    scripted = torch.jit.script(model)
    images, targets = make_targets("faster", [(64, 64)])
    scripted.eval()
    scripted(images)
    with pytest.raises(Exception, match="eqlv2 trains in eager mode only"):
        run_losses(scripted, images, targets)


@pytest.mark.parametrize("name", ["sigmoid", "federated", "seesaw", "eqlv2"])
def test_ohem_ranks_by_each_loss(name):
    model = tiny_model("faster", loss_cfg={"roi_head": {**LONG_TAIL[name], "sampler": "ohem"}})
    images, targets = make_targets("faster", [(64, 64), (64, 80)])
    losses = run_losses(model, images, targets)
    assert torch.isfinite(losses["loss_classifier"])
    logits, labels = batch(n=20, k=2, extra=1 if name == "seesaw" else 0)
    crit = model.roi_heads.cls_criterion.double()
    state = {k: v.clone() for k, v in crit.state_dict().items()}
    rank = crit.ranking(logits.detach(), labels)
    assert rank.shape == (20,) and (rank >= 0).all()
    assert all(torch.equal(v, crit.state_dict()[k]) for k, v in state.items())  # ranking updates nothing
    if name in ("sigmoid", "eqlv2"):  # the per-RoI terms of the loss itself (EQLv2 at its current weights)
        assert_same(rank.mean(), copy.deepcopy(crit)(logits.detach(), labels, None, None))


def test_builder_loads_a_seesaw_checkpoint_with_its_object_logit_and_counts(tmp_path):
    build = tv_lossfix.builders.build_with_report
    kw = dict(weights=None, weights_backbone=None, num_classes=3)
    model, _ = build("fasterrcnn_mobilenet_v3_large_320_fpn", loss_cfg={"roi_head": {"cls_loss": "seesaw"}}, **kw)
    model.roi_heads.cls_criterion.cum_samples += torch.tensor([50.0, 7.0, 2.0])
    path = tmp_path / "seesaw.pth"
    torch.save({"model": model.state_dict(), "model_settings": tv_lossfix.model_settings(model)}, path)

    again, report = build("fasterrcnn_mobilenet_v3_large_320_fpn", weights=str(path), weights_backbone=None)
    assert again.roi_heads.cls_loss == "seesaw"  # the checkpoint's loss config
    assert torch.equal(again.roi_heads.cls_criterion.cum_samples, model.roi_heads.cls_criterion.cum_samples)
    obj = "roi_heads.box_predictor.cls_objectness.weight"
    assert torch.equal(again.state_dict()[obj], model.state_dict()[obj])
    assert not any("cls_objectness (new" in line for line in report.replaced)  # the trained one, loaded

    from tv_lossfix.model_settings import ModelSettingsWarning

    with pytest.warns(ModelSettingsWarning, match="checkpoint roi_head.cls_loss=seesaw, given roi_head.cls_loss=ce"):
        ce, report = build(
            "fasterrcnn_mobilenet_v3_large_320_fpn", weights=str(path), weights_backbone=None, loss_cfg={}
        )
    assert ce.roi_heads.cls_loss == "ce" and not isinstance(ce.roi_heads.box_predictor, SeesawPredictor)
    assert any(
        "roi_heads.cls_criterion.cum_samples not loaded (roi_head.cls_loss 'ce'" in line for line in report.replaced
    )


def test_seesaw_with_lvis_sized_counts_in_half_precision_is_finite():
    # Counts past float16's 65504 (LVIS's frequent classes): the ratios are taken in float32.
    logits, labels = batch(extra=1)
    counts = torch.tensor([1e7, 2e6, 3.0, 70000.0, 1.0, 5.0, 9e5])
    loss = C.seesaw_loss(logits.detach().half(), labels, counts)
    ref = C.seesaw_loss(logits.detach().float(), labels, counts)
    assert torch.isfinite(loss) and torch.allclose(loss.float(), ref, rtol=1e-2)
