"""Loading a checkpoint's processor (`Qwen2_5OmniProcessor`, or `Qwen3OmniMoeProcessor` for
Qwen3-Omni), with or without torchvision.

transformers' only video processor for these models (`Qwen2VLVideoProcessor`) needs
torchvision, and the processors' `from_pretrained` always builds one, so without torchvision
it fails even for text, audio and images. Then we assemble the same processor from its other parts
(same files, same classes, same chat template) and put a stand-in where the video processor
goes that refuses video with a clear message.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, NoReturn

from transformers import (
    AutoFeatureExtractor,
    AutoImageProcessor,
    AutoTokenizer,
    ProcessorMixin,
    Qwen2_5OmniProcessor,
    Qwen3OmniMoeProcessor,
)
from transformers.video_processing_utils import VideoProcessorMixin

from omni.checkpoints.family import QWEN3_OMNI, family_of

log = logging.getLogger(__name__)


class VideoUnavailable(VideoProcessorMixin):
    """Takes the video processor's place when torchvision is missing; refuses every video."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __call__(self, videos: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "video input needs torchvision (transformers' Qwen2VLVideoProcessor); "
            "install torchvision or send camera frames as images"
        )


class AcceptsVideoUnavailable(ProcessorMixin):
    """A processor holding VideoUnavailable, which its class check would refuse.

    (Without torchvision that check fails for any video processor: transformers' video
    processor registry is itself a torchvision placeholder then.)
    """

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, VideoUnavailable):
            return VideoUnavailable
        return super().check_argument_for_proper_class(argument_name, argument)


class ProcessorWithoutVideo(AcceptsVideoUnavailable, Qwen2_5OmniProcessor):
    """Qwen2_5OmniProcessor without video."""


class Qwen3ProcessorWithoutVideo(AcceptsVideoUnavailable, Qwen3OmniMoeProcessor):
    """Qwen3OmniMoeProcessor without video."""


def has_video_processor() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_processor(path: str | Path) -> Qwen2_5OmniProcessor | Qwen3OmniMoeProcessor:
    """The checkpoint's processor (by its family); video input works only where torchvision
    is installed."""
    qwen3 = family_of(Path(path)) is QWEN3_OMNI
    if has_video_processor():
        return (Qwen3OmniMoeProcessor if qwen3 else Qwen2_5OmniProcessor).from_pretrained(path)
    log.info("torchvision is not installed: the processor takes text, audio and images, not video")
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(path, backend="pil"),
        "video_processor": VideoUnavailable(),
        "feature_extractor": AutoFeatureExtractor.from_pretrained(path),
        "tokenizer": AutoTokenizer.from_pretrained(path),
    }
    cls = Qwen3ProcessorWithoutVideo if qwen3 else ProcessorWithoutVideo
    processor_dict, kwargs = cls.get_processor_dict(path)
    args = [parts[name] for name in cls.get_attributes()]
    return cls.from_args_and_dict(args, processor_dict, **kwargs)
