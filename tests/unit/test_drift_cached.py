"""The drift detector takes model answers, not the scene cache's copies of them: pure logic."""

from __future__ import annotations

from services.telemetry.drift import DriftDetector
from shared.config import DriftSettings
from shared.schemas import CacheSource, ClassScore, ModelRef, Prediction, Timings


def _prediction(i: int, cached: bool) -> Prediction:
    return Prediction(
        device="d", camera="c", frame_id=f"f{i}", captured_at=None, top=[ClassScore(index=0, label="cat", score=0.9)],
        model=ModelRef(name="m", version=1, sha256="a" * 64), provider="CPUExecutionProvider",
        timings=Timings(queued_ms=0, preprocess_ms=1, inference_ms=0.0 if cached else 10.0, total_ms=2, batch_size=1),
        published_at=0.0, cached=cached,
        cache=CacheSource(frame_id="f0", age_ms=40.0, match="scene") if cached else None,
    )


def test_cached_predictions_neither_fill_the_baseline_nor_the_window():
    detector = DriftDetector("d", DriftSettings(baseline=10, window=20, min_samples=10))
    detector.observe(_prediction(0, cached=False))
    for i in range(50):
        assert detector.observe(_prediction(i + 1, cached=True)) == []
    assert detector.baseline is None and len(detector._collecting) == 1 and not detector.window
