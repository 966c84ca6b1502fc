"""Prompt -> images through an exported bundle: the Python API and what ``python -m pipeline sample`` runs.

    from pipeline.sampling.text2image import Text2Image
    t2i = Text2Image.from_bundle("bundle/", device="cpu")
    images = t2i(["a large red circle on the left"], num_images=4, seed=0)          # list[PIL.Image]
    variations = t2i(["a red circle"], image="photo.png")                            # DALL-E 2 variations
    edited = t2i(["a large blue square at the top"], init_image="in.png", strength=0.6)   # SDEdit
    frames = t2i.interpolate("a shape", "a.png", "b.png", frames=5)                  # slerp of image embeddings

The bundle is verified file by file against bundle.json before anything loads (pipeline/bundle.py), and every
network is loaded strictly. Sampling is pipeline.sampling.cascade's: prompts -> T5 (-> CLIP text -> prior ->
image embedding, when a stage is conditioned on one) -> base stage -> each super-resolution stage -> autoencoder
decode for latent stages. Image i of a seed is the same whether 1 or N images are drawn (per-image generators).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from pipeline.bundle import PRIOR_META, STAGE_META, Bundle
from pipeline.config_schema import from_dict
from pipeline.diffusion.schedules import DiffusionConfig, build_schedule
from pipeline.errors import CheckpointError, ConfigError, UsageError
from pipeline.models.autoencoder import LatentCodec, load_autoencoder
from pipeline.models.diffusers_attention import install_attention
from pipeline.models.frozen_clip import FrozenClip
from pipeline.models.fused_norm import install_fused_norm
from pipeline.models.loading import load_diffusers_strict
from pipeline.models.unet import Conditioning, UNetConfig, null_condition
from pipeline.sampling.cascade import CascadeLevel, SamplingConfig, check_chain, sample_cascade, with_overrides
from pipeline.sampling.prior import PriorSampler
from pipeline.sampling.shapes import cascade_shapes
from pipeline.text.t5 import FrozenT5Encoder, T5EncoderConfig

ImageInput = str | Path | Image.Image
MAX_STEPS = 1000


def _pil(image: ImageInput, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what}: cannot read image {image} ({exc})") from None


def to_tensor(image: Image.Image, size: int | tuple[int, int]) -> torch.Tensor:
    """PIL -> (3, H, W) in [-1, 1] for size = (H, W) (an int: a square): resized to cover it (bicubic), centre crop."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    width, height = image.size
    scale = max(out_w / width, out_h / height)
    resized = image.resize((max(out_w, round(width * scale)), max(out_h, round(height * scale))), Image.BICUBIC)
    left, top = (resized.size[0] - out_w) // 2, (resized.size[1] - out_h) // 2
    array = torch.frombuffer(bytearray(resized.crop((left, top, left + out_w, top + out_h)).tobytes()),
                             dtype=torch.uint8).view(out_h, out_w, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] -> N RGB images (rounded to the nearest 8-bit value)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5 + 0.5).to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy(), "RGB") for p in pixels]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of unit vectors (B, E) at fraction t (0 = a, 1 = b), renormalised."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return F.normalize(out, dim=-1)


def _load_level(bundle: Bundle, name: str, device: torch.device, decode: Callable | None) -> CascadeLevel:
    """A bundle's U-Net component as a cascade level. Its t2i_stage.json is read with the configs of the layers
    below (diffusion, U-Net architecture, sampling defaults), not the training stage's: the same file every bundle
    since format 2 holds."""
    folder = bundle.folder(name)
    meta_path = folder / STAGE_META
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    model = meta["model"]
    source = str(meta_path)
    diffusion = from_dict(DiffusionConfig, model["diffusion"], source=source, prefix="model.diffusion")
    architecture = from_dict(UNetConfig, model["unet"], source=source, prefix="model.unet")
    defaults = from_dict(SamplingConfig, model["sampling"], source=source, prefix="model.sampling")
    network = PixArtTransformer2DModel if model.get("backbone", "unet") == "dit" else UNet2DConditionModel
    unet = load_diffusers_strict(network, folder)
    backend = model.get("attention", "sdpa") if device.type == "cuda" else "sdpa"  # every backend computes the same
    install_attention(unet, backend)
    if architecture.fused_norm and network is UNet2DConditionModel:
        install_fused_norm(unet, backend)
    if meta["space"] == "latent":
        if decode is None:
            raise UsageError(f"{folder}: a latent stage needs the bundle's autoencoder component")
        expected = meta.get("autoencoder_sha256")
        have = {e["sha256"] for n, e in bundle.entry("autoencoder")["files"].items() if n.endswith(".safetensors")}
        if expected and expected not in have:
            raise CheckpointError(f"{folder}: this latent stage was trained on another autoencoder than the "
                                  f"bundle's; export the autoencoder run it was trained with into the bundle")
    resolution = int(meta["resolution"])
    super_res = model.get("super_res", {})
    return CascadeLevel(name=model["name"], unet=unet.to(device), cond=Conditioning(**meta["conditioning"]),
                        schedule=build_schedule(diffusion, resolution), target=diffusion.target,
                        resolution=resolution, grid=tuple(meta["grid"]), defaults=defaults,
                        low_res=int(super_res.get("low_res", 0)),
                        sample_noise_level=float(super_res.get("sample_noise_level", 0.0)),
                        decode=decode if meta["space"] == "latent" else None,
                        drop_sizes=bool(model.get("micro_conditioning", {}).get("drop_with_text", False)),
                        buckets=tuple((int(h), int(w)) for h, w in meta.get("buckets", ())))


class Text2Image:
    """An exported cascade, loaded and ready to sample (see the module docstring)."""

    def __init__(self, bundle: Bundle, levels: list[CascadeLevel], device: torch.device,
                 codec: LatentCodec | None = None) -> None:
        self.bundle, self.levels, self.device, self.codec = bundle, levels, device, codec
        self._t5: dict[int, FrozenT5Encoder] = {}
        self._prior: PriorSampler | None = None
        self._clip: FrozenClip | None = None
        check_chain(levels)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu") -> Text2Image:
        """Verify and load `path` (a bundle written by ``python -m pipeline export``)."""
        device = torch.device(device)
        bundle = Bundle.open(path)
        order = bundle.cascade()
        codec = None
        if any(bundle.entry(n).get("space") == "latent" for n in order):
            codec = load_autoencoder(bundle.folder("autoencoder")).to(device)
        decode = codec.decode if codec is not None else None
        return cls(bundle, [_load_level(bundle, n, device, decode) for n in order], device, codec)

    # ------------------------------------------------------------------------------------------ helpers
    def _encode_text(self, prompts: list[str] | None, level: CascadeLevel,
                     count: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 tokens (B, L, D) and mask for `prompts`; None: `count` null conditions (variations without text)."""
        if prompts is None:
            dummy = {"text": torch.zeros(count, 1, level.cond.text_dim, device=self.device),
                     "mask": torch.ones(count, 1, dtype=torch.bool, device=self.device)}
            null = null_condition(dummy, torch.ones(count, dtype=torch.bool, device=self.device), keys=("text",))
            return null["text"], null["mask"]
        max_length = int(self.bundle.entry(self._name(level))["t5"]["max_length"])
        if max_length not in self._t5:
            entry = self.bundle.entry("t5")
            path = entry.get("reference") or str(self.bundle.folder("t5"))
            self._t5[max_length] = FrozenT5Encoder(T5EncoderConfig(path=path, max_length=max_length),
                                                   strict=True).to(self.device).eval()
        emb, mask = self._t5[max_length].encode(prompts)
        return emb.float(), mask

    def _name(self, level: CascadeLevel) -> str:
        return f"unet_{level.name}"

    def _frozen_clip(self) -> FrozenClip:
        if self._clip is None:
            self._clip = FrozenClip.load(self.bundle.folder("clip"), "bundle clip").to(self.device).eval()
        return self._clip

    def _prior_sampler(self) -> PriorSampler:
        if self._prior is None:
            folder = self.bundle.folder("prior")
            expected = json.loads((folder / PRIOR_META).read_text(encoding="utf-8"))["clip"].get("weights_sha256")
            have = {e["sha256"] for n, e in self.bundle.entry("clip")["files"].items() if n.endswith(".safetensors")}
            if expected and expected not in have:
                raise CheckpointError(f"{folder}: the prior was trained against another CLIP than the bundle's; "
                                      "export the CLIP run it was trained with into the bundle")
            self._prior = PriorSampler.from_pretrained(folder, self._frozen_clip(), self.device)
        return self._prior

    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """CLIP image embeddings (N, E), L2-normalised, of the bundle's CLIP (variations, interpolation)."""
        clip = self._frozen_clip()
        info = clip.info
        mean = torch.tensor(info.mean).view(1, 3, 1, 1)
        std = torch.tensor(info.std).view(1, 3, 1, 1)
        pixels = torch.stack([to_tensor(_pil(i, "--image"), info.image_size) for i in images])
        normalised = ((pixels + 1.0) / 2.0 - mean) / std
        with torch.no_grad():
            return clip.encode_image(normalised.to(self.device)).float()

    def _image_embeds(self, prompts: list[str], seed: int, image: ImageInput | None,
                      image_embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if not any(level.cond.image_embed_dim for level in self.levels):
            if image is not None or image_embeds is not None:
                raise UsageError("this bundle's stages are not conditioned on CLIP image embeddings (no unCLIP "
                                 "stage): --image variations need one")
            return {}
        if image_embeds is not None:
            return {"image_embed": image_embeds.to(self.device).float()}
        if image is not None:
            return {"image_embed": self.embed_images([image]).expand(len(prompts), -1)}
        return {"image_embed": self._prior_sampler().embed(prompts, seed=seed).to(self.device)}

    def _settings(self, guidance: float | None, steps: int | None, sampler: str | None) -> list[SamplingConfig]:
        if steps is not None and not 1 <= steps <= MAX_STEPS:
            raise UsageError(f"--steps must be between 1 and {MAX_STEPS}, got {steps}")
        if guidance is not None and guidance < 1.0:
            raise UsageError(f"--guidance must be >= 1 (1 disables guidance), got {guidance}")
        try:
            return [with_overrides(level.defaults, guidance=guidance, steps=steps, sampler=sampler)
                    for level in self.levels]
        except ConfigError as exc:
            raise UsageError(str(exc)) from None

    # ---------------------------------------------------------------------------------------- sampling
    def generate(self, prompts: str | Sequence[str], *, num_images: int = 1, guidance: float | None = None,
                 steps: int | None = None, sampler: str | None = None, seed: int = 0,
                 image: ImageInput | None = None, image_embeds: torch.Tensor | None = None,
                 init_image: ImageInput | None = None, strength: float = 0.6,
                 progress: Callable[[int, int], None] | None = None, original_size: tuple[int, int] | None = None,
                 crop_top_left: tuple[int, int] = (0, 0), height: int | None = None,
                 width: int | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1], N = len(prompts) * num_images (prompt-major order).

        height / width: the output shape (default: the last stage's resolution; one given, the other defaults to
        it); a shape the cascade was not trained on fails with one line naming the nearest it can make.
        original_size / crop_top_left: the size conditioning of stages trained with it (default "uncropped,
        original = target"; the crop in output pixels), see sample_cascade.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or any(not p.strip() for p in prompts):
            raise UsageError("the prompt is empty: say what the image should show")
        if num_images < 1:
            raise UsageError(f"--num-images must be >= 1, got {num_images}")
        settings = self._settings(guidance, steps, sampler)
        shape = self._shape(height, width)
        prompts = [p for p in prompts for _ in range(num_images)]
        extra = self._image_embeds(prompts, seed, image, image_embeds)
        init = None
        if init_image is not None:
            if not 0.0 < strength <= 1.0:
                raise UsageError(f"--strength must be in (0, 1], got {strength}")
            base_shape = cascade_shapes(self.levels, *shape)[0] if shape else None
            init = self._init_grid(init_image, len(prompts), base_shape)
        with torch.no_grad():
            outs = sample_cascade(self.levels, prompts, self._encode_text, seed=seed, settings=settings, extra=extra,
                                  progress=progress, init=init, strength=strength, original_size=original_size,
                                  crop_top_left=crop_top_left, shape=shape)
        return outs[-1]

    def _shape(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        """The final (height, width) asked for (one given: the other is the last stage's resolution), checked
        against the cascade's buckets before any model runs; None: the resolution square."""
        if height is None and width is None:
            return None
        side = self.levels[-1].resolution
        shape = (side if height is None else height, side if width is None else width)
        cascade_shapes(self.levels, *shape)
        return shape

    def _init_grid(self, init_image: ImageInput, count: int, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """The base stage's own grid of an init image: pixels of `shape` (default: its resolution square), or
        their latents."""
        base = self.levels[0]
        pixels = to_tensor(_pil(init_image, "--init-image"), shape or base.resolution)[None].to(self.device)
        if base.decode is not None:
            with torch.no_grad():
                pixels = self.codec.encode(pixels)
        return pixels.expand(count, -1, -1, -1)

    def __call__(self, prompts: str | Sequence[str], **kwargs) -> list[Image.Image]:
        """:meth:`generate` as PIL images."""
        return to_pil(self.generate(prompts, **kwargs))

    def variations(self, image: ImageInput, *, num_images: int = 4, seed: int = 0, guidance: float | None = None,
                   steps: int | None = None, sampler: str | None = None,
                   progress: Callable[[int, int], None] | None = None, height: int | None = None,
                   width: int | None = None, original_size: tuple[int, int] | None = None,
                   crop_top_left: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """DALL-E 2 variations: images (N, 3, H, W) in [-1, 1] from `image`'s CLIP image embedding alone (the text
        is the null condition; guidance acts on the image embedding); height / width and the size conditioning
        as in :meth:`generate`."""
        if num_images < 1:
            raise UsageError(f"--num-images must be >= 1, got {num_images}")
        settings = self._settings(guidance, steps, sampler)
        shape = self._shape(height, width)
        extra = self._image_embeds(["variation"] * num_images, seed, image, None)
        encode = lambda prompts, level: self._encode_text(None, level, len(prompts))  # noqa: E731
        with torch.no_grad():
            return sample_cascade(self.levels, [""] * num_images, encode, seed=seed, settings=settings, extra=extra,
                                  progress=progress, shape=shape, original_size=original_size,
                                  crop_top_left=crop_top_left)[-1]

    def interpolate(self, prompt: str, start: ImageInput | torch.Tensor, end: ImageInput | torch.Tensor, *,
                    frames: int = 5, seed: int = 0, **kwargs) -> list[Image.Image]:
        """DALL-E 2 interpolation: images along the slerp between two CLIP image embeddings (images or (E,)
        vectors), same prompt and seed for every frame."""
        if frames < 2:
            raise UsageError(f"interpolation needs at least 2 frames, got {frames}")
        ends = [e.float().view(1, -1).to(self.device) if isinstance(e, torch.Tensor) else self.embed_images([e])
                for e in (start, end)]
        embeds = torch.cat([slerp(ends[0], ends[1], i / (frames - 1)) for i in range(frames)])
        return to_pil(torch.cat([self.generate(prompt, image_embeds=embeds[i:i + 1], seed=seed, **kwargs)
                                 for i in range(frames)]))


def save_grid(images: list[Image.Image], path: Path) -> None:
    """Images in rows of ceil(sqrt(N)) into one PNG."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * width, (i // cols) * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def sample_to_file(bundle: Path, prompt: str | None, out: Path, *, num_images: int = 1, guidance: float | None = None,
                   steps: int | None = None, sampler: str | None = None, seed: int = 0, device: str = "cpu",
                   out_dir: Path | None = None, image: Path | None = None, init_image: Path | None = None,
                   strength: float = 0.6, progress: Callable[[int, int], None] | None = None,
                   height: int | None = None, width: int | None = None,
                   original_size: tuple[int, int] | None = None, crop_top_left: tuple[int, int] = (0, 0)) -> list[Path]:
    """Generate images for `prompt` from `bundle` into the PNG grid `out` (and one PNG each into `out_dir`)."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {out}")
    if prompt is None and image is None:
        raise UsageError("give --prompt, or --image for variations of an image")
    t2i = Text2Image.from_bundle(bundle, device)
    if prompt is None:
        if init_image is not None:
            raise UsageError("--init-image needs a --prompt")
        images = to_pil(t2i.variations(image, num_images=num_images, seed=seed, guidance=guidance, steps=steps,
                                       sampler=sampler, progress=progress, height=height, width=width,
                                       original_size=original_size, crop_top_left=crop_top_left))
    else:
        images = t2i(prompt, num_images=num_images, guidance=guidance, steps=steps, sampler=sampler, seed=seed,
                     image=image, init_image=init_image, strength=strength, progress=progress, height=height,
                     width=width, original_size=original_size, crop_top_left=crop_top_left)
    save_grid(images, out)
    written = [out]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(images):
            path = out_dir / f"{out.stem}_{i:03d}.png"
            picture.save(path)
            written.append(path)
    return written
