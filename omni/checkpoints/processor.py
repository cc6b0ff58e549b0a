"""Loading a checkpoint's `Qwen2_5OmniProcessor`, with or without torchvision.

transformers' only Qwen2.5-Omni video processor (`Qwen2VLVideoProcessor`) needs torchvision,
and `Qwen2_5OmniProcessor.from_pretrained` always builds one, so without torchvision it fails
even for text, audio and images. Then we assemble the same processor from its other parts
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
    Qwen2_5OmniProcessor,
)
from transformers.video_processing_utils import VideoProcessorMixin

log = logging.getLogger(__name__)


class VideoUnavailable(VideoProcessorMixin):
    """Takes the video processor's place when torchvision is missing; refuses every video."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __call__(self, videos: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            "video input needs torchvision (transformers' Qwen2VLVideoProcessor); "
            "install torchvision or send camera frames as images"
        )


class ProcessorWithoutVideo(Qwen2_5OmniProcessor):
    """Qwen2_5OmniProcessor holding VideoUnavailable, which its class check would refuse.

    (Without torchvision that check fails for any video processor: transformers' video
    processor registry is itself a torchvision placeholder then.)
    """

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, VideoUnavailable):
            return VideoUnavailable
        return super().check_argument_for_proper_class(argument_name, argument)


def has_video_processor() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_processor(path: str | Path) -> Qwen2_5OmniProcessor:
    """The checkpoint's processor; video input works only where torchvision is installed."""
    if has_video_processor():
        return Qwen2_5OmniProcessor.from_pretrained(path)
    log.info("torchvision is not installed: the processor takes text, audio and images, not video")
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(path, backend="pil"),
        "video_processor": VideoUnavailable(),
        "feature_extractor": AutoFeatureExtractor.from_pretrained(path),
        "tokenizer": AutoTokenizer.from_pretrained(path),
    }
    processor_dict, kwargs = ProcessorWithoutVideo.get_processor_dict(path)
    args = [parts[name] for name in ProcessorWithoutVideo.get_attributes()]
    return ProcessorWithoutVideo.from_args_and_dict(args, processor_dict, **kwargs)
