"""The public manifest: the only thing the client and the service must agree on.

The service publishes it at `GET /v2/models/{name}/manifest` (`GET /v2/models/{name}` is the
Open Inference Protocol's model metadata, which points there); the client builds its keys,
encodes its inputs and decodes results from it alone. Common fields are typed here; `scheme`
and `layout` belong to the plan that wrote them and are validated by that plan's client codec.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from heinfer.errors import ModelFormatError

__all__ = [
    "CALLER_VIEW_VERSION",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "ExtractionSpec",
    "InputSpec",
    "KeysSpec",
    "Manifest",
    "OutputSpec",
    "PrecisionSpec",
    "PrivacySpec",
    "extraction_spec",
    "manifest_json_schema",
]

MANIFEST_FORMAT: Final = "heinfer.manifest"
# 2: `privacy.extraction`. Clients parse with extra="forbid", so a version-1 client would
# refuse a manifest holding it with a bare validation error; the bump turns that into
# "upgrade heinfer". Version-1 manifests (models compiled before) still load and are served
# unchanged, without the field.
MANIFEST_VERSION = 2
# 3: `allowed_layouts`, which only a served manifest carries, and only when the service's
# budget rules switch some of the model's layouts off for the caller (server/budget.py). The
# bump is for the same reason as 2's; every other caller gets the compiled document unchanged.
CALLER_VIEW_VERSION = 3
SUPPORTED_MANIFEST_VERSIONS = (1, 2, 3)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    shape: list[int]
    low: float = Field(description="smallest input value the encoding represents")
    high: float = Field(description="largest input value the encoding represents")
    bits: int | None = Field(
        default=None, ge=1, le=16, description="quantization bits per feature (BFV plans)"
    )
    encoding: str
    client_side: list[str] = Field(
        default_factory=list,
        description="steps the client applies locally before encrypting (e.g. a feature "
        "extractor); the served layer takes their output",
    )


class OutputSpec(_Strict):
    shape: list[int]
    classes: list[int | str] | None = None


class KeysSpec(_Strict):
    public: bool = True
    relin: bool = False
    galois_steps: list[int] = Field(default_factory=list)
    galois_elements: list[int] = Field(
        default_factory=list, description="Galois elements (not rotation steps) of BFV keys"
    )


class PrecisionSpec(_Strict):
    max_abs_error: float = Field(description="worst-case |decrypted - plaintext| bound")
    expected_abs_error: float = Field(description="6-sigma bound for typical inputs")
    noise_abs_error: float = Field(description="bound on the part caused by HE noise")
    input_abs_error: float | None = Field(
        default=None, description="3-sigma score error caused by input quantization alone"
    )
    input_choice: str | None = Field(
        default=None, description="why the input quantization has the bits it has"
    )


class ExtractionSpec(_Strict):
    """How many answered samples determine the model: encryption hides inputs and weights, not
    what the answers themselves reveal (SECURITY.md, "Model extraction")."""

    samples: int = Field(
        ge=1,
        description="answered samples that determine the parameters (`exact`) or that an "
        "equation-solving attack with known architecture needs at least (not `exact`)",
    )
    parameters: int = Field(ge=1, description="weights and biases of the model")
    exact: bool = Field(
        description="true: this many well-chosen samples recover every parameter (linear "
        "models); false: a count of equations, neither proven sufficient nor a lower bound "
        "for learning-based extraction"
    )
    notes: str


def extraction_spec(parameters: int, outputs: int, *, linear: bool) -> ExtractionSpec:
    """Each answered sample gives one equation per output in the model's parameters, so
    ceil(parameters / outputs) samples are what solving for them takes: n_features + 1 for a
    linear model (exactly enough, with inputs in general position)."""
    samples = -(-parameters // outputs)
    if linear:
        notes = (
            f"scores are linear in the {parameters} weights and intercepts: {samples} samples "
            "in general position (n_features + 1) determine all of them, to the precision of "
            "the scores"
        )
    else:
        notes = (
            f"{parameters} parameters, {outputs} scores per sample: an equation-solving attack "
            f"knowing the architecture needs at least {samples} samples; learning-based "
            "extraction can approximate the model's decisions with other amounts"
        )
    return ExtractionSpec(samples=samples, parameters=parameters, exact=linear, notes=notes)


class PrivacySpec(_Strict):
    rerandomized: bool
    masked: bool
    flooding_statistical_bits: int
    notes: str
    extraction: ExtractionSpec | None = None  # None: compiled before manifest version 2


class Manifest(_Strict):
    format: Literal["heinfer.manifest"] = MANIFEST_FORMAT
    format_version: int = MANIFEST_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    model_version: int = 1
    task: Literal["classification", "regression"]
    estimator: str
    input: InputSpec
    output: OutputSpec
    scheme: dict[str, Any]
    layout: dict[str, Any]
    allowed_layouts: list[str] | None = Field(
        default=None,
        description="the layout kinds (of those `layout` describes) this caller may use: "
        "the service switches the others off for it (403 layout_disabled). Absent: every "
        "layout is open. Only in served manifests, which then have format_version 3.",
    )
    keys: KeysSpec
    precision: PrecisionSpec
    privacy: PrivacySpec
    max_batch: int = Field(ge=1)

    @property
    def n_features(self) -> int:
        return int(self.input.shape[0])

    @property
    def n_outputs(self) -> int:
        return int(self.output.shape[0])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @model_validator(mode="after")
    def _caller_view_is_versioned(self) -> Manifest:
        if self.allowed_layouts is not None and self.format_version < CALLER_VIEW_VERSION:
            raise ValueError(f"allowed_layouts needs format_version {CALLER_VIEW_VERSION}")
        return self

    def for_caller(self, allowed: list[str] | None) -> Manifest:
        """The document served to a caller who may use only `allowed` (None: every layout):
        the compiled manifest itself when nothing is switched off, so that one document, the
        same for every such caller, stays cacheable and readable by older clients."""
        if allowed is None:
            return self
        update = {"allowed_layouts": sorted(allowed), "format_version": CALLER_VIEW_VERSION}
        return self.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        # A version-1 manifest goes out as it came in: its clients forbid unknown fields.
        exclude: dict[str, Any] = {}
        if self.privacy.extraction is None:
            exclude["privacy"] = {"extraction"}
        if self.allowed_layouts is None:
            exclude["allowed_layouts"] = True
        return self.model_dump(mode="json", exclude=exclude or None)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse a manifest, refusing other formats and newer versions with a clear message."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise ModelFormatError("not a heinfer manifest (missing format marker)")
        version = data.get("format_version")
        if version not in SUPPORTED_MANIFEST_VERSIONS:
            raise ModelFormatError(
                f"manifest format version {version} is not supported by this heinfer "
                f"(supports {', '.join(map(str, SUPPORTED_MANIFEST_VERSIONS))}); upgrade heinfer"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ModelFormatError(f"invalid manifest: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelFormatError(f"manifest is not JSON: {exc}") from exc
        return cls.from_dict(data)


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of the manifest, for users validating it outside Python."""
    return Manifest.model_json_schema()
