"""SD1.x and SDXL LoRA files in the formats ComfyUI's LoRA loader reads, built for the tests.

Key names come from the host's own key map (comfy.lora.model_lora_keys_unet), so each file is named
exactly as the tools that write these formats name it: kohya (with lora_up/lora_down/alpha, LoCon with k×k
conv factors, LoHa, LoKr, DoRA; sd-scripts names SD1.x layers by their diffusers paths,
'lora_unet_down_blocks_0_...', and SDXL layers by their LDM paths, 'lora_unet_input_blocks_4_1_...') and
diffusers/PEFT ('unet.down_blocks.0....processor.to_q' with lora_A/lora_B).
"""
from __future__ import annotations

import os

import torch

FORMATS = ("kohya", "peft", "locon", "loha", "lokr", "dora")

# Layers of one block of each kind of role, at three resolutions (64, 8 and 64 latent px at 512 px).
BLOCKS = ("input_blocks.1.1", "middle_block.1", "output_blocks.11.1")
TRANSFORMER_LAYERS = ("proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
                      "transformer_blocks.0.attn1.to_v", "transformer_blocks.0.attn1.to_out.0",
                      "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_k",
                      "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn2.to_out.0",
                      "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "proj_out")
# LoCon also trains convolutions outside the transformers: a ResBlock's 3×3 convs, its timestep
# embedding projection and skip conv, conv_in, a downsampler (stride 2) and conv_out.
CONV_LAYERS = ("input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.1.0.emb_layers.1",
               "input_blocks.1.0.out_layers.3", "input_blocks.3.0.op", "input_blocks.4.0.skip_connection",
               "output_blocks.2.1.conv", "out.2")


# SDXL: a depth-2 transformer at each end and the depth-10 middle one; in each, the layers of its first and
# last BasicTransformerBlock. LoCon adds the same kinds of convs as for SD1.x and SDXL's label_emb (the ADM
# vector's projection, which has no image locations).
SDXL_BLOCKS = {"input_blocks.4.1": 2, "middle_block.1": 10, "output_blocks.5.1": 2}
SDXL_CONV_LAYERS = ("input_blocks.0.0", "input_blocks.1.0.in_layers.2", "input_blocks.1.0.emb_layers.1",
                    "input_blocks.1.0.out_layers.3", "input_blocks.3.0.op", "input_blocks.4.0.skip_connection",
                    "output_blocks.2.2.conv", "out.2", "label_emb.0.0")


# Every attention and MLP layer of one DiT block, by the host's model class (comfy.supported_models): what the DiT
# LAG tests (dit_lag_checks.py) and benchmarks/bench_lag_lora.py put LoRAs on.
DIT_BLOCK_LAYERS = {
    "Anima": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
              "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj",
              "mlp.layer1", "mlp.layer2"),
    "Krea2": ("attn.wq", "attn.wk", "attn.wv", "attn.gate", "attn.wo", "mlp.gate", "mlp.up", "mlp.down"),
}
# those of them that run before their block's concept map is made (Anima: its self-attention and the cross-attention's
# query; Krea 2: the joint attention's projections, whose query projection makes the map)
DIT_BEFORE_LAYERS = {"Anima": ("self_attn.q_proj", "self_attn.v_proj", "self_attn.output_proj", "cross_attn.q_proj"),
                     "Krea2": ("attn.wq", "attn.wk", "attn.wv", "attn.gate")}


def attention_layers(blocks=BLOCKS) -> list[str]:
    return [f"{block}.{layer}" for block in blocks for layer in TRANSFORMER_LAYERS]


def sdxl_attention_layers(blocks=tuple(SDXL_BLOCKS)) -> list[str]:
    layers = []
    for block in blocks:
        for j in sorted({0, SDXL_BLOCKS[block] - 1}):
            layers += [f"{block}.{layer}".replace("transformer_blocks.0.", f"transformer_blocks.{j}.")
                       for layer in TRANSFORMER_LAYERS if layer.startswith("transformer_blocks.0.") or j == 0]
    return layers


def is_sdxl(model) -> bool:
    return model.model.model_config.unet_config.get("context_dim") == 2048


def layers_of(fmt: str, sdxl: bool = False) -> list[str]:
    attention, convs = (sdxl_attention_layers, SDXL_CONV_LAYERS) if sdxl else (attention_layers, CONV_LAYERS)
    blocks = tuple(SDXL_BLOCKS) if sdxl else BLOCKS
    if fmt == "locon":
        return attention() + list(convs)
    if fmt in ("loha", "lokr", "dora"):   # weight-space adapters: fewer layers keep the test quick
        return attention(blocks[:1]) + ["input_blocks.1.0.in_layers.2"]
    return attention()


_NAMES: dict[int, dict[str, list[str]]] = {}


def names_of(model) -> dict[str, list[str]]:
    """Every name the host's key map gives each UNet weight ('diffusion_model.<path>.weight')."""
    import comfy.lora

    if id(model.model) not in _NAMES:
        names: dict[str, list[str]] = {}
        for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
            names.setdefault(target, []).append(name)
        _NAMES[id(model.model)] = names
    return _NAMES[id(model.model)]


def is_dit(model) -> bool:
    return not hasattr(model.model.diffusion_model, "input_blocks")


def alias(model, path: str, fmt: str) -> str:
    """The name a `fmt` file gives the denoiser layer at `path`, from the host's key map."""
    names = names_of(model).get(f"diffusion_model.{path}.weight", [])
    ldm = "lora_unet_" + path.replace(".", "_")
    if fmt == "peft":   # diffusers/PEFT names: the UNet's "unet.", a DiT's diffusers or ai-toolkit names
        wanted = [k for k in names if k.startswith("unet.") or is_dit(model) and not k.startswith("lora_unet_")]
    elif is_sdxl(model) or is_dit(model):   # sd-scripts' SDXL UNet and the DiT trainers keep the module names
        wanted = [ldm]
    else:   # SD1.x kohya names derive from the diffusers layer names, not the LDM ones
        wanted = [k for k in names if k.startswith("lora_unet_") and k != ldm] or [ldm]
    if not wanted:
        raise KeyError(f"no {fmt} name for {path}")
    return sorted(wanted)[0]


def build_lora(model, fmt: str, seed: int = 0, rank: int = 4, scale: float = 0.3,
               layers: list[str] | None = None, low_rank_kronecker: bool = False) -> dict[str, torch.Tensor]:
    """A random LoRA of format `fmt` whose ΔW entries are about `scale`·√(rank / fan-in) times W's spread.

    low_rank_kronecker: LoKr's large factor as two rank-`rank` matrices (lokr_w2_a·lokr_w2_b, with alpha), as
    kohya_ss writes LoKr for Anima; else one full lokr_w2."""
    generator = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    tensors: dict[str, torch.Tensor] = {}
    for path in layers or layers_of(fmt, is_sdxl(model)):
        weight = unet.get_submodule(path).weight.detach().float()
        out_f, in_f = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:])
        size = scale * weight.std().item()
        name = alias(model, path, fmt)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator)

        if fmt in ("kohya", "locon", "dora"):
            # ΔW = up·down·alpha/rank with entries of about `size`
            down = randn(rank, in_f, *kernel) / (in_f * max(1, len(kernel) and kernel[0] * kernel[1])) ** 0.5
            up = randn(out_f, rank, *(1,) * len(kernel)) * size
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(float(rank))})
            if fmt == "dora":
                norm = weight.reshape(out_f, -1).norm(dim=1, keepdim=True)
                scale_shape = (out_f, *(1,) * (weight.dim() - 1))
                tensors[f"{name}.dora_scale"] = (norm * (1 + 0.1 * randn(out_f, 1))).reshape(scale_shape)
        elif fmt == "peft":
            tensors.update({f"{name}.lora_A.weight": randn(rank, in_f, *kernel) / in_f ** 0.5,
                            f"{name}.lora_B.weight": randn(out_f, rank, *(1,) * len(kernel)) * size})
        elif fmt == "loha":
            flat = in_f * (kernel[0] * kernel[1] if kernel else 1)
            factor = (size / rank ** 0.5) ** 0.5
            tensors.update({f"{name}.hada_w1_a": randn(out_f, rank) * factor,
                            f"{name}.hada_w1_b": randn(rank, flat) * factor,
                            f"{name}.hada_w2_a": randn(out_f, rank),
                            f"{name}.hada_w2_b": randn(rank, flat) / rank ** 0.5,
                            f"{name}.alpha": torch.tensor(float(rank))})
        elif fmt == "lokr":
            flat = in_f * (kernel[0] * kernel[1] if kernel else 1)
            a, b = 4, 4
            tensors[f"{name}.lokr_w1"] = randn(a, b)
            if low_rank_kronecker:
                tensors.update({f"{name}.lokr_w2_a": randn(out_f // a, rank) * size,
                                f"{name}.lokr_w2_b": randn(rank, flat // b) / (rank ** 0.5 * b),
                                f"{name}.alpha": torch.tensor(float(rank))})
            else:
                tensors[f"{name}.lokr_w2"] = randn(out_f // a, flat // b) * size
        else:
            raise ValueError(fmt)
    return tensors


def write_lora(loras_dir: str, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Save under models/loras; returns the name the LoRA loaders list."""
    from safetensors.torch import save_file

    os.makedirs(loras_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(loras_dir, name))
    return name


# Names of example-workflow LoRAs -> (seed, trigger words); the tests write stand-ins under these names.
EXAMPLE_LORAS = {"character_a.safetensors": (21, "ohwx, woman"), "character_b.safetensors": (22, "zkz, man")}
SDXL_EXAMPLE_LORAS = {"character_a_sdxl.safetensors": (23, "ohwx, woman"),
                      "character_b_sdxl.safetensors": (24, "zkz, man")}


def placeholder_lora(path: str) -> str:
    """A valid kohya LoRA file of one SD1.5 layer with a zero change, for combos that only need the name."""
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    from safetensors.torch import save_file
    save_file({f"{name}.lora_up.weight": torch.zeros(320, 1, 1, 1),
               f"{name}.lora_down.weight": torch.zeros(1, 320, 1, 1), f"{name}.alpha": torch.tensor(1.0)}, path)
    return path
