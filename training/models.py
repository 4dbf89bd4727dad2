"""Small CNNs for the reference bundles (training/export only: imports torch, never used at run time).

``PhantomNet`` maps a (N, 1, 256, 256) image to
- ``scores``: (N, L) logits: in the exported model label 0 (nodule / mass) is the peak of its heatmap
  logits; the others come from a global branch (sees the whole thorax: heart size needs context),
- ``heatmap``: (N, L, 64, 64) sigmoid class-activation maps at stride 4 from a high-resolution branch
  (fine enough that the peak of a 4-8 px nodule lands within a pixel or two after refinement).

NOT FOR CLINICAL USE: trained on synthetic phantoms only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

INPUT_SIZE = 256
HEATMAP_STRIDE = 4


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PhantomNet(nn.Module):
    def __init__(self, num_labels: int, width: int = 8):
        super().__init__()
        w = width
        self.stem = _block(1, w, stride=2)  # 128
        self.s2 = nn.Sequential(_block(w, 2 * w), nn.MaxPool2d(2))  # 64  (stride 4)
        self.s3 = nn.Sequential(_block(2 * w, 4 * w), nn.MaxPool2d(2))  # 32  (stride 8)
        self.s4 = _block(4 * w, 4 * w, dilation=2)  # 32, wider context
        self.head = nn.Sequential(_block(6 * w, 2 * w), nn.Conv2d(2 * w, num_labels, 1))  # CAM logits, stride 4
        self.glob = nn.Sequential(
            nn.MaxPool2d(2),
            _block(4 * w, 4 * w),
            nn.MaxPool2d(2),
            _block(4 * w, 4 * w),  # 8x8
        )
        self.fc = nn.Linear(8 * w, num_labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f2 = self.s2(self.stem(x))
        f4 = self.s4(self.s3(f2))
        up = F.interpolate(f4, scale_factor=2.0, mode="nearest")
        cam = self.head(torch.cat([f2, up], dim=1))
        g = self.glob(f4)
        pooled = torch.cat([g.mean(dim=(2, 3)), g.amax(dim=(2, 3))], dim=1)
        scores = self.fc(pooled)
        return scores, cam

    def export_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the bundle computes. Label 0 (nodule / mass) is scored by the peak of its densely trained map:
        a 5 px lesion is averaged away by the global branch but stands out in its own map."""
        scores, cam = self.forward(x)
        point = cam[:, 0].flatten(1).amax(dim=1, keepdim=True)
        scores = torch.cat([point, scores[:, 1:]], dim=1)
        return scores, torch.sigmoid(cam)


class _Export(nn.Module):
    def __init__(self, net: PhantomNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.export_forward(x)


def export_onnx(
    net: nn.Module, path: str, input_size: int = INPUT_SIZE, output_names: tuple[str, ...] = ("scores", "heatmap")
) -> None:
    """Single-file ONNX, opset 17, dynamic batch; input "image", outputs "scores" and "heatmap" by default."""
    module = _Export(net).eval() if isinstance(net, PhantomNet) else net.eval()
    dummy = torch.zeros(1, 1, input_size, input_size)
    torch.onnx.export(
        module,
        (dummy,),
        path,
        input_names=["image"],
        output_names=list(output_names),
        dynamic_axes={"image": {0: "N"}, **{name: {0: "N"} for name in output_names}},
        opset_version=17,
        dynamo=False,
    )
