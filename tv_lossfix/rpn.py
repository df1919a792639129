"""Region proposal network with a configurable loss."""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from . import losses as L
from ._utils import HEAD_LOSS_ATTRIBUTES, apply_loss_cfg, avg_factor, loss_cfg_repr, loss_state, scale, set_criterion
from .cls_losses import registered, resolved_param
from .config import RPNLossConfig
from .sampling import SAMPLING_ATTRIBUTES, apply_sampling, check_sampling, fg_bg_sample

__all__ = ["LossFixRPN"]


class LossFixRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` whose loss follows an :class:`RPNLossConfig`.

    Proposals, sampling (same sampler calls, same order), parameters and ``state_dict`` are
    those of the parent; at default settings the losses equal stock torchvision's. With
    ``neg_pos_ub >= 0`` the sampler caps the negatives (see :mod:`tv_lossfix.sampling`).
    After each training forward, ``loss_state`` holds the detached tensors that
    :func:`tv_lossfix.training_stats` turns into statistics (sampled anchors, normalizers).

    Build one with :func:`tv_lossfix.patch_model` or the builders; ``LossFixRPN(*args,
    loss_cfg=..., **kwargs)`` takes the parent's arguments.
    """

    # The loss settings are plain attributes, set by set_loss_cfg() (see _utils.apply_loss_cfg).
    __annotations__ = {
        **RegionProposalNetwork.__annotations__,
        **HEAD_LOSS_ATTRIBUTES,
        **SAMPLING_ATTRIBUTES,
        "focal_alpha": float,
    }

    def __init__(self, *args, loss_cfg: Optional[RPNLossConfig] = None, sync_avg_factor: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_loss_cfg(loss_cfg, sync_avg_factor)

    @torch.jit.unused
    def set_loss_cfg(self, cfg: Optional[RPNLossConfig], sync_avg_factor: bool = False) -> None:
        """Replace the loss settings (parameters untouched)."""
        cfg = RPNLossConfig() if cfg is None else cfg
        check_sampling(self, cfg)
        apply_loss_cfg(self, cfg, sync_avg_factor)
        apply_sampling(self, cfg)
        # None: torchvision.ops.sigmoid_focal_loss's default; -1 (no alpha weighting) is kept as is.
        self.focal_alpha = float(resolved_param(cfg.to_dict(), registered("rpn_head", "focal"), "focal_alpha"))
        set_criterion(self, cfg, 2)  # the objectness loss, from the registry (tv_lossfix.cls_losses)

    def extra_repr(self) -> str:
        return loss_cfg_repr(self)

    def compute_loss(
        self,
        objectness: Tensor,
        pred_bbox_deltas: Tensor,
        labels: List[Tensor],
        regression_targets: List[Tensor],
        anchors: Optional[List[Tensor]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Objectness and box losses of the sampled anchors (stock signature + ``anchors``).

        ``anchors`` is needed only by the IoU box losses, which decode the deltas.
        """
        pos_list, neg_list = fg_bg_sample(self.fg_bg_sampler, labels, self.neg_pos_ub)
        pos = torch.cat(pos_list)
        neg = torch.cat(neg_list)
        num_images = len(pos_list)
        # One nonzero for the whole batch (stock: two); everything after works on the sampled set.
        sampled = torch.where(pos | neg)[0]
        is_pos = pos[sampled] > 0

        cls_avg = avg_factor(self.cls_avg_factor, is_pos, self.sync_avg_factor, pos, neg, num_images)
        bbox_avg = cls_avg
        if self.bbox_avg_factor != self.cls_avg_factor:
            bbox_avg = avg_factor(self.bbox_avg_factor, is_pos, self.sync_avg_factor, pos, neg, num_images)

        weight = L.sample_weights(is_pos, self.cls_pos_weight)
        loss_cls = self.cls_criterion(objectness.flatten()[sampled], is_pos, cls_avg, weight)

        ref_boxes: Optional[Tensor] = None
        if self.bbox_loss != "smooth_l1" and self.bbox_loss != "l1":
            if anchors is None:
                raise ValueError(f"bbox_loss={self.bbox_loss} needs the anchors: pass anchors= to compute_loss")
            ref_boxes = torch.cat(anchors, dim=0)[sampled]
        loss_box = L.box_regression_loss(
            pred_bbox_deltas[sampled],
            torch.cat(regression_targets, dim=0)[sampled],
            is_pos,
            bbox_avg,
            self.bbox_loss,
            self.smooth_l1_beta,
            ref_boxes,
            self.box_coder.weights,
        )

        self.loss_state = loss_state(is_pos, cls_avg, bbox_avg)
        self.loss_state_images = num_images
        return scale(loss_cls, self.loss_cls_weight), scale(loss_box, self.loss_bbox_weight)

    def forward(
        self,
        images: ImageList,
        features: Dict[str, Tensor],
        targets: Optional[List[Dict[str, Tensor]]] = None,
    ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        # Same steps and sampler calls as the parent; only the loss call differs (it needs anchors).
        feature_maps = list(features.values())
        objectness, pred_bbox_deltas = self.head(feature_maps)
        anchors = self.anchor_generator(images, feature_maps)
        num_images = len(anchors)
        shapes = [o[0].shape for o in objectness]
        num_anchors_per_level = [s[0] * s[1] * s[2] for s in shapes]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # Proposals are not backpropagated through (Faster R-CNN), hence detach.
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)

        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets, anchors
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses
