"""Request and response models of the HTTP service (pydantic; FastAPI turns them into the OpenAPI schema).

``POST /v1/predict`` reads its body by content type (see :mod:`.inputs`), so its request body is
declared by hand in :func:`predict_request_body`: raw image types, ``multipart/form-data`` and the
JSON batch (:class:`BatchRequest`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

#: Media types accepted as a raw image body (any other ``image/*`` is accepted too).
RAW_IMAGE_TYPES = (
    "image/png",
    "image/jpeg",
    "image/tiff",
    "image/bmp",
    "image/webp",
    "image/gif",
    "application/octet-stream",
)


class BatchImage(BaseModel):
    """One image of a JSON batch."""

    data: str = Field(
        description="the image file's bytes, base64 (standard alphabet; a 'data:image/...;base64,' prefix is allowed)"
    )
    name: str | None = Field(
        None, max_length=256, description="label echoed back and used in error messages (default images[i])"
    )


class BatchRequest(BaseModel):
    """``POST /v1/predict`` with ``Content-Type: application/json``."""

    images: list[BatchImage] = Field(min_length=1, description="the images to score (at most max_batch_images)")


class Region(BaseModel):
    """A connected region of the anomaly map at or above the region threshold."""

    x: int = Field(description="left edge, pixels of the image as sent (after its EXIF orientation)")
    y: int = Field(description="top edge, pixels")
    width: int
    height: int
    area_fraction: float = Field(description="share of the image the region's pixels cover")
    max_score: float = Field(description="largest anomaly-map value in the region, [0, 1]")
    mean_score: float = Field(description="mean anomaly-map value in the region, [0, 1]")


class SourceInfo(BaseModel):
    """What the uploaded file was."""

    format: str | None = Field(description="Pillow's format name: PNG, JPEG, TIFF...")
    mode: str = Field(description="Pillow's pixel mode as stored: RGB, L, P (palette), I;16 (16-bit)...")
    frames: int = Field(description="frames in the file; only the first is scored")
    exif_orientation: int = Field(description="EXIF orientation applied before scoring (1: none)")


class ImageResult(BaseModel):
    """The answer for one image."""

    name: str
    score: float = Field(description="image score: mean of the top-k anomaly-map pixels (+ q_weight * q)")
    normalised_score: float = Field(description="score in standard deviations above the validation normals' mean")
    q: float = Field(description="image head probability, [0, 1]")
    label: int | None = Field(
        description="1: anomalous (score >= threshold), 0: normal, null: the run has no threshold"
    )
    anomalous: bool | None
    threshold: float | None = Field(description="the run's decision threshold (from held-out labeled normals)")
    image_size: list[int] = Field(description="[H, W] of the image as scored (after EXIF orientation)")
    source: SourceInfo
    model_version: str = Field(description="sha256 prefix of the checkpoint's weights and state")
    heatmap_png_base64: str | None = Field(
        None, description="anomaly map as an 8-bit grey PNG at image_size (with ?heatmap=true)"
    )
    regions: list[Region] | None = Field(None, description="defect regions (with ?regions=true)")
    regions_total: int | None = Field(None, description="regions found before max_regions was applied")
    region_threshold: float | None = Field(None, description="map value the regions were cut at")
    warnings: list[str] = Field(
        default_factory=list,
        description="what was done to the image that a client should know (first frame only, 16-bit rescaled...)",
    )


class PredictResponse(BaseModel):
    results: list[ImageResult] = Field(description="one per image, in the order sent")


class LimitInfo(BaseModel):
    name: str = Field(description="the setting that refused the request (max_body_bytes, max_pixels...)")
    value: Any = Field(description="what the request had (null when unknown before reading it)")
    allowed: Any = Field(description="the configured limit")


class ErrorResponse(BaseModel):
    """Every error answer (4xx and 5xx) has this body."""

    error: str = Field(
        description="kind: not_an_image, corrupt_image, body_too_large, too_many_pixels, "
        "unauthorized, queue_full, timeout, replica_unavailable..."
    )
    status: int
    detail: str = Field(description="what was wrong and what is expected")
    limit: LimitInfo | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    model_replicas_running: int
    detail: str


class ModelInfo(BaseModel):
    """``GET /v1/model``: what is being served (no file-system paths)."""

    run_id: str = Field(description="the run folder's name")
    model_version: str
    category: str
    encoder: str
    image_size: int = Field(description="side of the square the model scores images at")
    threshold: float | None
    threshold_source: str | None
    metrics: dict[str, Any] = Field(
        description="test metrics at training time (metrics.json: overall and per defect type)"
    )
    device: str
    memory_banks: int
    tta: str
    limits: dict[str, Any]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries with the :class:`ErrorResponse` body for ``codes``."""
    text = {
        400: "unreadable request: not an image, truncated or corrupt file, empty body, bad base64 / JSON / multipart",
        401: "missing or wrong bearer token (when the server has one)",
        408: "the request body did not arrive within body_timeout_s",
        413: "too large: body over max_body_bytes, image over max_pixels, batch over max_batch_images",
        415: "unsupported Content-Type",
        422: "an image the model cannot score meaningfully (shorter side under min_side, aspect over "
        "max_aspect, animated with animated=refuse) or an invalid parameter",
        500: "internal error (the body still says what happened)",
        503: "queue full or model replica unavailable: retry after the Retry-After header's seconds",
        504: "not answered within request_timeout_s",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


def predict_request_body() -> dict[str, Any]:
    """OpenAPI ``requestBody`` of ``POST /v1/predict`` (the :class:`BatchRequest` schema is added to
    the components by :func:`add_components`)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    content: dict[str, Any] = {t: binary for t in RAW_IMAGE_TYPES}
    content["image/*"] = binary
    content["multipart/form-data"] = {
        "schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {
                    "type": "string",
                    "format": "binary",
                    "description": "an image file; several file parts make a batch",
                }
            },
        }
    }
    content["application/json"] = {"schema": {"$ref": "#/components/schemas/BatchRequest"}}
    return {
        "required": True,
        "content": content,
        "description": "one image as the raw body (Content-Type image/*), one or more as multipart file parts, "
        "or a JSON batch of base64 images",
    }


def add_components(openapi: dict[str, Any]) -> dict[str, Any]:
    """Add :class:`BatchRequest` (and the models it uses) to ``openapi``'s component schemas."""
    schema = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    comps = openapi.setdefault("components", {}).setdefault("schemas", {})
    comps.update(schema.pop("$defs", {}))
    comps["BatchRequest"] = schema
    return openapi
