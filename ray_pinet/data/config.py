"""Config of ``ray-pinet prepare``: source, cleaning policy, strata and sample building."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from ray_pinet.config_base import ConfigError, FileConfig, require

SOURCES = ("movielens_100k", "movielens_csv", "amazon_seq", "amazon2018_csv", "taobao_csv", "csv", "parquet")


@dataclass
class SourceConfig:
    """Where the raw log is and how to read it.

    ``format`` picks an adapter; ``csv``/``parquet`` are the generic readers and use ``columns`` to map
    canonical names to the file's names, e.g. ``{user_id: uid, item_id: sku, timestamp: ts}``. ``path`` is a
    local file, a directory, a glob, or any pyarrow/fsspec URI, or a list of them (read as their union).
    """

    format: str = "movielens_csv"
    path: Union[str, list[str]] = "data/ml-latest-small/ratings.csv"
    columns: dict[str, str] = field(default_factory=dict)
    has_header: bool = True  # generic csv only
    delimiter: str = ","  # generic csv only
    timestamp_unit: Literal["s", "ms", "us", "ns", "iso"] = "s"  # generic readers only
    behaviors: list[str] = field(default_factory=list)  # taobao: keep only these (empty = all)

    def validate(self) -> None:
        if self.format not in SOURCES:
            raise ConfigError(f"format: {self.format!r} is not one of {list(SOURCES)}")
        paths = self.path if isinstance(self.path, list) else [self.path]
        # An empty path would read the working directory (recursively).
        require(all(str(p).strip() for p in paths), "path", "a file, folder, glob or URI (not empty)", self.path)


@dataclass
class CleanConfig:
    """What happens to rows the samples cannot use. Every removal is counted in report.json."""

    # drop_exact: identical (user, item, timestamp) rows collapse to one.
    # drop_pair: keep only the first (earliest) event of each (user, item) pair.
    # keep: keep every row.
    duplicates: Literal["drop_exact", "drop_pair", "keep"] = "drop_exact"
    # Users with fewer events (after dedup) than this are removed: leave-one-out needs
    # at least one training event, a validation and a test event.
    min_history: int = 3
    min_rating: Optional[float] = None  # drop rows rated below this (implicit-feedback view)
    # Validation/test targets whose item never occurs in any training position.
    # keep: evaluate them anyway (counted); drop: remove those evaluation rows (counted).
    unseen_items: Literal["keep", "drop"] = "keep"
    # Keep this share of the users, whole (a development slice; 1.0 = all). The choice is a
    # stable hash of the user id, so a user is in or out the same way in every file, bucket,
    # daily partition and process; the removed rows and users are counted like every filter.
    sample_users: float = 1.0

    def validate(self) -> None:
        if self.min_history < 3:
            raise ConfigError("min_history must be >= 3 (one train, one validation, one test event)")
        if not 0.0 < self.sample_users <= 1.0:
            raise ConfigError(f"sample_users must be in (0, 1], got {self.sample_users}")


@dataclass
class StrataConfig:
    """How users are split into activeness strata (methods.md §1.3). Stratum 0 = least active."""

    mode: Literal["top_fraction", "min_count", "quantiles"] = "top_fraction"
    q: float = 0.2  # top_fraction: share of users (by activeness) that is head
    tau: int = 20  # min_count: head iff activeness >= tau
    k: int = 4  # quantiles: number of buckets

    def validate(self) -> None:
        if not 0.0 < self.q < 1.0:
            raise ConfigError(f"q must be in (0, 1), got {self.q}")
        if self.tau < 1:
            raise ConfigError(f"tau must be >= 1, got {self.tau}")
        if self.k < 2:
            raise ConfigError(f"k must be >= 2, got {self.k}")

    @property
    def num_strata(self) -> int:
        return self.k if self.mode == "quantiles" else 2


@dataclass
class SamplesConfig:
    """Leave-one-out sequence samples."""

    max_len: int = 50  # history window L
    # Training sequences longer than max_len + 1 are cut into windows of max_len + 1 items
    # that end max_len apart, so every training position is used exactly once as a target.
    window: Literal["all", "last"] = "all"
    train_negatives: int = 1  # sampled negatives per training position (BCE losses)
    eval_candidates: int = 0  # 0 = full-catalogue ranking; >0 also stores that many sampled candidates
    # Where the per-user negative draws come from. keyed: a counter-based hash of (seed, purpose, user_idx,
    # draw), vectorised (ray_pinet/keyed_random.py). generator: one numpy Generator([seed, purpose, user_idx])
    # per user, ~30 µs each (30 s of CPU per million users); the only choice before 2026-11-24, kept to
    # rebuild older prepared data exactly. Full-ranking metrics (HR, NDCG) never read these draws; AUC/GAUC's
    # sampled negatives and BCE's training negatives do.
    draws: Literal["keyed", "generator"] = "keyed"

    def validate(self) -> None:
        if self.max_len < 1:
            raise ConfigError("max_len must be >= 1")
        if self.train_negatives < 0 or self.eval_candidates < 0:
            raise ConfigError("train_negatives and eval_candidates must be >= 0")


@dataclass
class PrepareConfig(FileConfig):
    source: SourceConfig = field(default_factory=SourceConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    strata: StrataConfig = field(default_factory=StrataConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    output: str = "prepared/ml-latest-small"
    seed: int = 0
    num_buckets: int = 8  # user-hash partitions: each bucket holds whole users; bounds memory per task

    def validate(self) -> None:
        require(bool(self.output.strip()), "output", "a directory", self.output)
        require(self.seed >= 0, "seed", ">= 0", self.seed)
        require(1 <= self.num_buckets <= 1 << 16, "num_buckets", "in 1..65536 (prepare_tasks.HASH_SLOTS)",
                self.num_buckets)
