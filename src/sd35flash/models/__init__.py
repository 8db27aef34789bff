"""Build, load and save SD3 pipelines: the toy teacher, offline tokenizers, real checkpoints, and the
student schedule file ``sd35flash.json``.

Every model is a diffusers ``StableDiffusion3Pipeline`` folder; see ``docs/ARCHITECTURE.md``.
"""

from sd35flash.models.pipeline_io import is_local_path, load_pipeline, save_pipeline
from sd35flash.models.student_info import (
    FILENAME,
    StudentInfo,
    info_to_json,
    read_student_info,
    write_student_info,
)
from sd35flash.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from sd35flash.models.toy import (
    ToyConfig,
    build_scheduler,
    build_text_encoders,
    build_toy_pipeline,
    build_transformer,
    build_vae,
    check_config,
    count_parameters,
)

__all__ = [
    "FILENAME",
    "StudentInfo",
    "ToyConfig",
    "build_clip_tokenizer",
    "build_scheduler",
    "build_t5_tokenizer",
    "build_text_encoders",
    "build_toy_pipeline",
    "build_transformer",
    "build_vae",
    "check_config",
    "count_parameters",
    "info_to_json",
    "is_local_path",
    "load_pipeline",
    "read_student_info",
    "save_pipeline",
    "write_student_info",
]
