"""RoI heads (Fast R-CNN box head, mask and keypoint branches) with configurable losses."""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    keypointrcnn_inference,
    keypointrcnn_loss,
    maskrcnn_inference,
    project_masks_on_boxes,
)
from torchvision.ops import boxes as box_ops

from . import losses as L
from ._utils import HEAD_LOSS_ATTRIBUTES, apply_loss_cfg, avg_factor, loss_cfg_repr, loss_state, scale, set_criterion
from .class_agnostic import is_class_agnostic
from .classifiers import check_classifier
from .cls_losses import registered
from .config import LossConfigError, RoILossConfig
from .sampling import SAMPLING_ATTRIBUTES, apply_sampling, check_sampling, fg_bg_sample, hard_examples

__all__ = ["LossFixRoIHeads", "predictor_num_classes", "is_class_agnostic_box", "is_class_agnostic_mask"]


def predictor_num_classes(box_predictor: nn.Module) -> Optional[int]:
    """Classes (background included) of torchvision's box predictor; None for a custom one."""
    cls_score = getattr(box_predictor, "cls_score", None)
    return cls_score.out_features if isinstance(cls_score, nn.Linear) else None


# Class-agnostic predictors (MMDetection reg_class_agnostic / class_agnostic, Detectron2
# CLS_AGNOSTIC_BBOX_REG / CLS_AGNOSTIC_MASK) are told from the output shapes: host-side, no sync.
# The counts are class_agnostic.BOX_OUTPUTS / MASK_CHANNELS written out: TorchScript reads no global int.
def is_class_agnostic_box(class_logits: Tensor, box_regression: Tensor) -> bool:
    """One box delta (4 values) per RoI for a classifier over more than one class."""
    return is_class_agnostic(box_regression.shape[-1], class_logits.shape[-1], 4)


def is_class_agnostic_mask(mask_logits: Tensor, num_classes: int) -> bool:
    """One mask channel per RoI for a classifier over more than one class."""
    return is_class_agnostic(mask_logits.shape[1], num_classes, 1)


class LossFixRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` whose losses follow a :class:`RoILossConfig`.

    Inference, parameters, ``state_dict`` and the sampling of RoIs are the parent's (unless
    ``neg_pos_ub`` caps the negatives or ``sampler`` is ``"ohem"``, see :mod:`tv_lossfix.sampling`). torchvision
    computes these losses in module-level functions called from ``forward`` (no hook, see
    pytorch/vision#3753), so ``forward`` is ours; it calls the parent's building blocks.
    After each training forward, ``loss_state`` holds the detached tensors that
    :func:`tv_lossfix.training_stats` turns into statistics (sampled RoIs, normalizers, ``fg_prob``).
    """

    # The loss settings are plain attributes, set by set_loss_cfg() (see _utils.apply_loss_cfg).
    __annotations__ = {
        **RoIHeads.__annotations__,
        **HEAD_LOSS_ATTRIBUTES,
        **SAMPLING_ATTRIBUTES,
        "sampler": str,
        "loss_mask_weight": float,
        "loss_keypoint_weight": float,
        "use_class_weight": bool,
        "class_weight": Tensor,
        "softmax_scores": bool,
        "extra_outputs": int,
    }

    def __init__(self, *args, loss_cfg: Optional[RoILossConfig] = None, sync_avg_factor: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_loss_cfg(loss_cfg, sync_avg_factor)

    @torch.jit.unused
    def set_loss_cfg(self, cfg: Optional[RoILossConfig], sync_avg_factor: bool = False) -> None:
        """Replace the loss settings (parameters untouched).

        ``class_weight`` is checked against the box predictor here when it is torchvision's
        (a ``cls_score`` layer), and against the class logits at every training forward.
        """
        cfg = RoILossConfig() if cfg is None else cfg
        num_classes = predictor_num_classes(self.box_predictor)
        if num_classes is not None:
            cfg.check_num_classes(num_classes)
        check_sampling(self, cfg)
        check_classifier(self, cfg)
        spec = registered("roi_head", cfg.cls_loss)
        for key in spec.needs:
            if cfg.param(key) is None:
                raise LossConfigError(
                    f"roi_head.cls_loss {cfg.cls_loss} needs roi_head.{key} (references/train.py resolves 'auto' "
                    "from the training annotations)"
                )
        per_class = {key: cfg.param(key) for key in spec.per_class if cfg.param(key) is not None}
        if (spec.stateful or per_class) and num_classes is None:
            raise LossConfigError(
                f"roi_head.cls_loss {cfg.cls_loss} needs the class count of torchvision's box predictor "
                f"(cls_score), but roi_heads.box_predictor is a {type(self.box_predictor).__name__}"
            )
        for key, value in per_class.items():
            if num_classes is not None and len(value) != num_classes - 1:
                raise LossConfigError(
                    f"roi_head.{key} has {len(value)} entries but the model has {num_classes - 1} foreground "
                    "classes: give one entry per foreground class"
                )
        set_criterion(self, cfg, num_classes if num_classes is not None else 0)
        self.softmax_scores = bool(self.cls_criterion.softmax_scores)
        self.extra_outputs = int(spec.extra_outputs)
        apply_loss_cfg(self, cfg, sync_avg_factor)
        apply_sampling(self, cfg)
        self.sampler = str(cfg.sampler)
        self.loss_mask_weight = float(cfg.loss_mask_weight)
        self.loss_keypoint_weight = float(cfg.loss_keypoint_weight)
        self.use_class_weight = cfg.class_weight is not None
        param = next(self.parameters(), None)
        device = param.device if param is not None else None
        values = cfg.class_weight if cfg.class_weight is not None else [1.0]
        # Non-persistent: follows .to(device) but stays out of state_dict (stock keys).
        self.register_buffer("class_weight", torch.tensor(values, dtype=torch.float32, device=device), persistent=False)

    def extra_repr(self) -> str:
        return loss_cfg_repr(self)

    # -- losses ------------------------------------------------------------------------------
    def _classifier_loss(self, class_logits: Tensor, labels: Tensor, is_pos: Tensor, avg: Optional[Tensor]) -> Tensor:
        """Cross-entropy or softmax focal loss of the sampled RoIs, ``sum(w * loss) / avg``."""
        class_weight: Optional[Tensor] = None
        if self.use_class_weight:
            # Shapes are host-side: no device sync. The predictor may have been replaced after
            # the config was set; a mismatch would index out of range or weight the wrong class.
            if class_logits.shape[-1] - self.extra_outputs != self.class_weight.shape[0]:
                raise ValueError(
                    "roi_head.class_weight has " + str(self.class_weight.shape[0]) + " entries but the box "
                    "predictor returns "
                    + str(class_logits.shape[-1] - self.extra_outputs)
                    + " class logits (background "
                    "included): set a class_weight with one entry per class (model.roi_heads.set_loss_cfg)"
                )
            class_weight = self.class_weight
        # With the focal loss, class_weight[label] is its per-class alpha: the same per-sample factor.
        weight = L.sample_weights(is_pos, self.cls_pos_weight, labels, class_weight)
        return self.cls_criterion(class_logits, labels, avg, weight)

    def box_losses(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        labels: List[Tensor],
        regression_targets: List[Tensor],
        proposals: List[Tensor],
    ) -> Tuple[Tensor, Tensor]:
        """Classifier and box-regression losses of the sampled RoIs (no host sync)."""
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        num_rois = labels_all.shape[0]
        is_pos = labels_all > 0

        cls_avg = avg_factor("sampled", is_pos, self.sync_avg_factor)
        bbox_avg = cls_avg
        if self.bbox_avg_factor != "sampled":
            bbox_avg = avg_factor(self.bbox_avg_factor, is_pos, self.sync_avg_factor)

        loss_cls = self._classifier_loss(class_logits, labels_all, is_pos, cls_avg)
        if is_class_agnostic_box(class_logits, box_regression):
            deltas = box_regression  # the one slot every class shares
        else:
            # Class-specific deltas: the slot of each RoI's own label (background RoIs are masked out).
            idx = torch.arange(num_rois, device=labels_all.device)
            deltas = box_regression.reshape(num_rois, -1, 4)[idx, labels_all]
        ref_boxes: Optional[Tensor] = None
        if self.bbox_loss != "smooth_l1" and self.bbox_loss != "l1":
            ref_boxes = torch.cat(proposals, dim=0)
        loss_box = L.box_regression_loss(
            deltas,
            targets_all,
            is_pos,
            bbox_avg,
            self.bbox_loss,
            self.smooth_l1_beta,
            ref_boxes,
            self.box_coder.weights,
        )

        # Raw and detached; tv_lossfix.training_stats() derives the statistics when read.
        state = loss_state(is_pos, cls_avg, bbox_avg)
        state["class_logits"] = class_logits.detach()
        state["labels"] = labels_all
        self.loss_state = state
        self.loss_state_images = len(labels)
        return scale(loss_cls, self.loss_cls_weight), scale(loss_box, self.loss_bbox_weight)

    def mask_losses(
        self,
        mask_logits: Tensor,
        mask_boxes: List[Tensor],
        pos_idxs: List[Tensor],
        targets: List[Dict[str, Tensor]],
        class_agnostic: bool = False,
    ) -> Tensor:
        """Mask loss of the positive RoIs: targets cropped from the gt masks, per-pixel mean BCE.

        ``class_agnostic``: the logits have one channel, which every RoI uses whatever its class.
        """
        size = mask_logits.shape[-1]
        mask_targets = [
            project_masks_on_boxes(t["masks"], b, i, size) for t, b, i in zip(targets, mask_boxes, pos_idxs)
        ]
        mask_labels = torch.cat([t["labels"][i] for t, i in zip(targets, pos_idxs)], dim=0)
        if class_agnostic:
            mask_labels = torch.zeros_like(mask_labels)
        loss = L.mask_loss(mask_logits, mask_labels, torch.cat(mask_targets, dim=0))
        return scale(loss, self.loss_mask_weight)

    # -- sampling ----------------------------------------------------------------------------
    def subsample(self, labels: List[Tensor]) -> List[Tensor]:
        """Indices of the sampled RoIs per image: torchvision's sampler, with ``neg_pos_ub``'s cap if set."""
        pos, neg = fg_bg_sample(self.fg_bg_sampler, labels, self.neg_pos_ub)
        return [torch.where(p | n)[0] for p, n in zip(pos, neg)]

    def ohem_training_samples(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]],
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """``select_training_samples`` with MMDetection's OHEM sampler instead of the random one.

        Same candidates (the proposals plus the ground-truth boxes, matched by ``proposal_matcher``);
        each is scored by the current box head without gradient, and :func:`hard_examples` keeps
        the highest-loss positives and negatives of each image.
        """
        self.check_targets(targets)
        if targets is None:
            raise ValueError("targets should not be None")
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        losses = self.candidate_losses(features, proposals, image_shapes, labels)
        num, fraction = self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        matched_gt_boxes: List[Tensor] = []
        for i, loss in enumerate(losses.split([p.shape[0] for p in proposals])):
            keep = hard_examples(loss, labels[i], num, fraction, self.neg_pos_ub)
            proposals[i], labels[i], matched_idxs[i] = proposals[i][keep], labels[i][keep], matched_idxs[i][keep]
            gt = gt_boxes[i]
            if gt.numel() == 0:  # an image without objects: a dummy box, as torchvision (never a positive)
                gt = torch.zeros((1, 4), dtype=dtype, device=gt.device)
            matched_gt_boxes.append(gt[matched_idxs[i]])
        return proposals, matched_idxs, labels, self.box_coder.encode(matched_gt_boxes, proposals)

    def candidate_losses(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        labels: List[Tensor],
    ) -> Tensor:
        """Per-RoI classification loss of every candidate against its assigned label (OHEM's ranking), no gradient.

        The head's own classifier term ranks them, as MMDetection ranks by its configured ``loss_cls``:
        the registered loss's per-RoI ``ranking`` (cross-entropy, focal, sigmoid, Seesaw, EQLv2; the
        federated loss ranks by the sigmoid loss over every class), times ``class_weight[label]`` when
        set; unit sample weights (``cls_pos_weight`` is a loss weight, not a difficulty). The box head runs in its
        current mode, as in MMDetection (a BatchNorm box head also updates its running statistics).
        """
        with torch.no_grad():
            class_logits, _ = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals, image_shapes)))
            # Ignored candidates (label -1) are scored as background; hard_examples never keeps them.
            target = torch.cat(labels).clamp(min=0)
            loss = self.cls_criterion.ranking(class_logits, target)
            if self.use_class_weight:
                loss = loss * self.class_weight[target]
        return loss

    def postprocess_scores(
        self,
        class_scores: Tensor,
        box_regression: Tensor,
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
    ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """torchvision's ``postprocess_detections`` on probabilities already computed ([N, K + 1],
        background first): the loss's own inference scores (sigmoid, Seesaw, EQLv2) instead of the
        softmax. Same steps: clip, drop background, ``score_thresh``, small boxes, per-class NMS,
        ``detections_per_img``."""
        num_classes = class_scores.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        boxes_per_image = [p.shape[0] for p in proposals]
        all_boxes: List[Tensor] = []
        all_scores: List[Tensor] = []
        all_labels: List[Tensor] = []
        for boxes, scores, image_shape in zip(
            pred_boxes.split(boxes_per_image, 0), class_scores.split(boxes_per_image, 0), image_shapes
        ):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            inds = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels

    # -- forward -----------------------------------------------------------------------------
    def _check_target_types(self, targets: Optional[List[Dict[str, Tensor]]]) -> None:
        if targets is None:
            return
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
            if self.has_keypoint():
                if t["keypoints"].dtype != torch.float32:
                    raise TypeError(f"target keypoints must of float type, instead got {t['keypoints'].dtype}")

    def _branch_rois(
        self, proposals: List[Tensor], labels: List[Tensor], matched_idxs: List[Tensor], result: List[Dict[str, Tensor]]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """The RoIs the mask / keypoint branch runs on: when training, the positive sampled RoIs and
        their matched ground truth (a data-dependent count); at inference, the detections."""
        boxes: List[Tensor] = []
        idxs: List[Tensor] = []
        if not self.training:
            return [r["boxes"] for r in result], idxs
        for p, lab, m in zip(proposals, labels, matched_idxs):
            pos = torch.where(lab > 0)[0]
            boxes.append(p[pos])
            idxs.append(m[pos])
        return boxes, idxs

    # Each branch checks its modules for None itself, so TorchScript compiles it only when present.
    def _mask_branch(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]],
        labels: List[Tensor],
        matched_idxs: List[Tensor],
        result: List[Dict[str, Tensor]],
        losses: Dict[str, Tensor],
        num_classes: int,
    ) -> None:
        if self.mask_roi_pool is None or self.mask_head is None or self.mask_predictor is None:
            return
        mask_boxes, pos_idxs = self._branch_rois(proposals, labels, matched_idxs, result)
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
        agnostic = is_class_agnostic_mask(mask_logits, num_classes)
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None when training")
            losses["loss_mask"] = self.mask_losses(mask_logits, mask_boxes, pos_idxs, targets, agnostic)
        else:
            # A class-agnostic mask is channel 0 for every detection; the labels returned stay the detector's.
            det_labels = [torch.zeros_like(r["labels"]) if agnostic else r["labels"] for r in result]
            for p, r in zip(maskrcnn_inference(mask_logits, det_labels), result):
                r["masks"] = p

    def _keypoint_branch(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]],
        labels: List[Tensor],
        matched_idxs: List[Tensor],
        result: List[Dict[str, Tensor]],
        losses: Dict[str, Tensor],
    ) -> None:
        if self.keypoint_roi_pool is None or self.keypoint_head is None or self.keypoint_predictor is None:
            return
        kp_boxes, pos_idxs = self._branch_rois(proposals, labels, matched_idxs, result)
        kp_logits = self.keypoint_predictor(
            self.keypoint_head(self.keypoint_roi_pool(features, kp_boxes, image_shapes))
        )
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None when training")
            loss_kp = keypointrcnn_loss(kp_logits, kp_boxes, [t["keypoints"] for t in targets], pos_idxs)
            losses["loss_keypoint"] = scale(loss_kp, self.loss_keypoint_weight)
        else:
            kp_probs, kp_scores = keypointrcnn_inference(kp_logits, kp_boxes)
            for p, s, r in zip(kp_probs, kp_scores, result):
                r["keypoints"] = p
                r["keypoints_scores"] = s

    def forward(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        self._check_target_types(targets)
        labels: List[Tensor] = []
        matched_idxs: List[Tensor] = []
        regression_targets: List[Tensor] = []
        if self.training:
            if self.sampler == "ohem":
                proposals, matched_idxs, labels, regression_targets = self.ohem_training_samples(
                    features, proposals, image_shapes, targets
                )
            else:
                proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)

        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        result: List[Dict[str, Tensor]] = []
        losses: Dict[str, Tensor] = {}
        if self.training:
            loss_classifier, loss_box_reg = self.box_losses(
                class_logits, box_regression, labels, regression_targets, proposals
            )
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        else:
            agnostic = is_class_agnostic_box(class_logits, box_regression)
            if self.softmax_scores:
                if agnostic:
                    # torchvision's postprocessing decodes one delta per class: give every class the shared one.
                    box_regression = box_regression.repeat(1, class_logits.shape[-1])
                boxes, scores, det_labels = self.postprocess_detections(
                    class_logits, box_regression, proposals, image_shapes
                )
            else:
                class_scores = self.cls_criterion.scores(class_logits)
                if agnostic:
                    box_regression = box_regression.repeat(1, class_scores.shape[-1])
                boxes, scores, det_labels = self.postprocess_scores(
                    class_scores, box_regression, proposals, image_shapes
                )
            for b, s, lab in zip(boxes, scores, det_labels):
                result.append({"boxes": b, "labels": lab, "scores": s})

        num_classes = class_logits.shape[-1]
        self._mask_branch(features, proposals, image_shapes, targets, labels, matched_idxs, result, losses, num_classes)
        self._keypoint_branch(features, proposals, image_shapes, targets, labels, matched_idxs, result, losses)
        return result, losses
