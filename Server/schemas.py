"""Pydantic request/response schemas of the /v1 API (separate from the ORM tables)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .db import MAX_INTEGER


class VersionInfo(BaseModel):
    family: str
    number: int
    parent: int | None
    source: str
    created_at: float
    weights_sha256: str
    weights_size: int
    validation_mean_dice: float | None = None
    active: bool = False


class FamilyInfo(BaseModel):
    name: str
    region: str
    active_version: int | None
    labels: list[str] = []
    buffered_updates: int = 0


class PackageInfo(BaseModel):
    """A version's manifest; the weights are at ``weights_url`` (sha256 in the manifest)."""

    family: str
    version: int
    manifest: dict[str, Any]
    weights_url: str
    weights_sha256: str
    weights_size: int


UpdateStatus = Literal["buffered", "merged", "overridden", "rejected"]


class UpdateInfo(BaseModel):
    id: str
    family: str
    status: UpdateStatus
    reason: str
    parent_version: int
    merged_into: int | None
    n_slices: int
    created_at: float


class MeInfo(BaseModel):
    name: str
    scope: str
    token_id: int
    updates: int


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    admin: bool = False
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scope: Literal["contributor", "admin"] = "contributor"
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)


class IssuedToken(BaseModel):
    """The token appears here once and is never retrievable again."""

    user: str
    token: str
    token_id: int
    scope: str


class UserInfo(BaseModel):
    name: str
    is_admin: bool
    tokens: list[dict[str, Any]]


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0, le=MAX_INTEGER)


class MergeSettingsBody(BaseModel):
    """Partial merge settings; omitted fields keep their values."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # stored as JSON, which has no Infinity
    buffer_size: int | None = Field(default=None, ge=1, le=100)
    server_lr: float | None = Field(default=None, gt=0, le=10)
    robust_rule: Literal["trimmed_mean", "median", "mean"] | None = None
    trim_fraction: float | None = Field(default=None, ge=0, lt=0.5)
    clip_norm: float | None = Field(default=None, gt=0)
    max_case_weight: int | None = Field(default=None, ge=1, le=MAX_INTEGER)
    max_staleness: int | None = Field(default=None, ge=0, le=1000)
    dice_tolerance: float | None = Field(default=None, ge=0, le=1)
    label_tolerance: float | None = Field(default=None, ge=0, le=1)


class AuditInfo(BaseModel):
    id: int
    at: float
    actor: str
    action: str
    family: str | None
    detail: dict[str, Any]


class Accepted(BaseModel):
    id: str
    status: UpdateStatus
    duplicate: bool = False


class Problem(BaseModel):
    detail: str
