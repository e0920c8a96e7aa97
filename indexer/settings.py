"""Settings the `indexer` CLI and the service share: one pydantic-settings class (`TVS_*`, `.env`)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from indexer.feed_compaction import DEFAULT_RETENTION_S

if TYPE_CHECKING:
    from indexer.milvus_schema import MilvusConfig

logger = logging.getLogger(__name__)

# Beside the code, not in the current directory: the API and the CLI resolve the same model wherever they start.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
ENV_FILE_VAR = "TVS_ENV_FILE"  # which dotenv file to read (default `.env`; empty: none)
DEFAULT_ENV_FILE = ".env"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def default_model() -> str:
    """The bundled demo checkpoint when it is installed beside the code, else the small random-weight preset."""
    return str(DEMO_MODEL_DIR) if (DEMO_MODEL_DIR / "config.json").is_file() else "small"


def env_file() -> str | None:
    """The dotenv file both processes read, looked up when settings are made (so tests and tools can turn it off)."""
    return os.environ.get(ENV_FILE_VAR, DEFAULT_ENV_FILE) or None


class SharedSettings(BaseSettings):
    """What the `indexer` CLI and the API both read (env prefix `TVS_`, then `.env`); the service extends it."""

    model_config = SettingsConfigDict(env_prefix="TVS_", extra="ignore", protected_namespaces=())

    data_dir: Path = Path("./data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/catalog.db
    # An older PostgreSQL schema is upgraded at start-up only when this is true (SQLite always is, after
    # a backup copy); otherwise `indexer migrate` does it, once, as a release step.
    auto_migrate: bool = False
    model: str = Field(default_factory=default_model)
    device: str | None = None  # None: CUDA when present, else CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1)  # None: torch's default (all cores)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # --- the FAISS broad-view index (docs/deploy.md) ---
    # Where it lives: auto (a GPU when faiss has GPU support and sees one), cpu, cuda, cuda:N.
    index_device: str = "auto"
    index_nprobe: int | None = Field(default=None, ge=1)  # IVF lists scanned; None: the snapshot's, else 1
    index_ef_search: int | None = Field(default=None, ge=1)  # HNSW candidate pool; None: snapshot's, else 16
    # Approximate candidates re-scored exactly from the stored CLS vectors; None: 0 for Flat, else 100.
    index_rerank: int | None = Field(default=None, ge=0)
    # Changes younger than this are kept when a snapshot prunes the feed (indexer.feed_compaction).
    feed_retention_s: float = Field(default=DEFAULT_RETENTION_S, ge=0)
    # --- the vector backend: faiss (in every replica's memory, the default) or milvus (a database the
    # replicas share; they then hold no index and follow no change feed). docs/deploy.md, "A cluster".
    vector_backend: Literal["faiss", "milvus"] = "faiss"
    milvus_uri: str | None = (
        None  # a `.db` file (Milvus Lite, one process) or http://host:19530; None: <data_dir>/milvus.db
    )
    milvus_token: SecretStr | None = None  # user:password or an API key, for a server with authentication
    milvus_index: str = (
        "FLAT"  # the CLS field's index: TYPE or TYPE:key=value,... (IVF_FLAT:nlist=1024,nprobe=16)
    )
    milvus_prefix: str = Field(default="tvs", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")  # collection names
    milvus_timeout_s: float = Field(default=10.0, gt=0)  # per call; a search past it answers 503

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        dotenv = DotEnvSettingsSource(settings_cls, env_file=env_file())
        return init_settings, env_settings, dotenv, file_secret_settings

    @field_validator("model", "device", "database_url", mode="before")
    @classmethod
    def _blank_is_default(cls, value: Any, info: Any) -> Any:
        # `TVS_MODEL=` in an env file (or an image built without a baked model) means "the default".
        if isinstance(value, str) and not value.strip():
            return default_model() if info.field_name == "model" else None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        device = value.strip().lower()
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"{value!r} is not one of cpu, cuda, cuda:N")
        return device

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @field_validator("index_device")
    @classmethod
    def _index_device(cls, value: str) -> str:
        from indexer.index_device import IndexDeviceError, check_index_device

        try:
            return check_index_device(value)
        except IndexDeviceError as e:
            raise ValueError(f"TVS_INDEX_DEVICE: {e}") from e

    @field_validator("milvus_index")
    @classmethod
    def _milvus_index(cls, value: str) -> str:
        from indexer.milvus_schema import MilvusIndexSpecError, parse_index_spec

        try:
            parse_index_spec(value)
        except MilvusIndexSpecError as e:
            raise ValueError(str(e)) from e
        return value

    def milvus_config(self) -> MilvusConfig:
        """Where and how the Milvus backend stores a library (TVS_MILVUS_*)."""
        from indexer.milvus_schema import MilvusConfig, parse_index_spec

        kind, build, search = parse_index_spec(self.milvus_index)
        return MilvusConfig(
            uri=self.milvus_uri or str(self.data_dir / "milvus.db"),
            token=self.milvus_token.get_secret_value() if self.milvus_token else "",
            index_type=kind,
            index_params=build,
            search_params=search,
            prefix=self.milvus_prefix,
            timeout_s=self.milvus_timeout_s,
        )
