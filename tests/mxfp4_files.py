"""MXFP4 checkpoints written by our own code, as the published gpt-oss ones are: for the tests, and for GPU scripts,
which import this without pytest or conftest's side effects."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import FP4_VALUES

LUT = torch.tensor(FP4_VALUES)
# What the published gpt-oss checkpoints leave unquantized.
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' experts (E, in, out) -> blocks (E, out, in/32, 16) uint8 (two E2M1 values a byte, low nibble
    first), scales (E, out, in/32) uint8 (E8M0, bias 127), and the weights those dequantize to."""
    x = w.transpose(1, 2).float().reshape(w.shape[0], w.shape[2], w.shape[1] // 32, 32)
    exponent = torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True).clamp_min(2**-126) / 6.0))  # 6 = E2M1's largest
    codes = ((x / torch.exp2(exponent)).unsqueeze(-1) - LUT).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    dequantized = (LUT[codes.long()] * torch.exp2(exponent)).reshape(w.shape[0], w.shape[2], w.shape[1]).transpose(1, 2)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8), dequantized.to(w.dtype).contiguous()


def write_mxfp4_checkpoint(src: Path, dst: Path, reference: Path | None = None) -> None:
    """The float checkpoint in `src` with its experts quantized to MXFP4, written to `dst` as the published gpt-oss
    checkpoints are (blocks and scales, a quantization_config); `reference`: where to write also a float checkpoint
    of the weights those dequantize to."""
    weights = load_file(f"{src}/model.safetensors")
    packed, dequantized = {}, dict(weights)
    for name, w in weights.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed[f"{name}_blocks"], packed[f"{name}_scales"], dequantized[name] = quantize(w)
        else:
            packed[name] = w
    config = json.loads(Path(src, "config.json").read_text())
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    save_checkpoint(dst, packed, config | {"quantization_config": quantization})
    if reference is not None:
        save_checkpoint(reference, dequantized, config)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
