"""Choosing a cascade's threshold (edgefleet.models.cascade): the sweep on hand-made outputs where every
figure is known, then on the real FP32 model and its static INT8 on held-out real-photo crops: the
chosen threshold is the cheapest that meets the gate, the 2-fold cross-check chooses on one half and
measures on the other, and the cascade run as the service runs it escalates exactly the frames under the
threshold."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edgefleet import cli
from edgefleet.models import cascade
from edgefleet.models.derive import gate_target
from edgefleet.models.frames import load_inputs
from edgefleet.models.outputs import logits, session
from services.inference.session import DISABLED_OPTIMIZERS
from shared.manifest import load_verified

FREE = cascade.Timing("small", 1.0, 0.5, 8)
COSTLY = cascade.Timing("large", 10.0, 5.0, 8)


def _logits(top1: int, top2: int, p1: float, p2: float) -> np.ndarray:
    """Logits over 3 classes whose softmax is p1 for top1, p2 for top2 and the rest (less) for the third."""
    probs = np.full(3, 1 - p1 - p2)
    probs[top1], probs[top2] = p1, p2
    return np.log(probs)


def test_the_sweep_gives_share_agreement_and_time_at_every_cut_and_the_cheapest_passing_is_chosen():
    # Margins 0.6, 0.1, 0.3, 0.5; stage 1 is wrong on the two least sure images (margins 0.1 and 0.3).
    small = np.array([_logits(0, 1, 0.75, 0.15), _logits(1, 0, 0.45, 0.35), _logits(2, 0, 0.55, 0.25),
                      _logits(0, 2, 0.7, 0.2)])
    values = cascade.scores(small, "margin")
    assert values == pytest.approx([0.6, 0.1, 0.3, 0.5])
    assert cascade.scores(small, "confidence") == pytest.approx([0.75, 0.45, 0.55, 0.7])
    points = cascade.sweep(values, small.argmax(1), np.array([0, 0, 0, 0]), FREE, COSTLY)
    assert [round(p.threshold, 6) for p in points] == [0.0, 0.2, 0.4, 0.55, 0.8]  # halfway, and all escalated
    assert [p.escalated for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [p.agreement for p in points] == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert [p.ms_batch1 for p in points] == [1.0, 3.5, 6.0, 8.5, 11.0]
    assert points[2].ms_batched == pytest.approx(0.5 + 0.5 * 5.0)
    assert cascade.cheapest(points, 0.75) is points[1] and cascade.cheapest(points, 0.99) is points[2]
    # A gate no threshold meets: the most agreeing, cheapest point, for the caller to mark failed.
    assert cascade.cheapest(points, 1.01) is points[2]


@pytest.fixture(scope="module")
def outputs(data, model_dir, int8_dir):
    """Both real models' outputs on the 24 held-out crops (the session's static INT8, every layer quantized)."""
    int8 = int8_dir
    fp32, fp32_path = load_verified(model_dir)
    inputs = load_inputs(data / "eval", fp32)
    small = session(load_verified(int8)[1], 1)
    large = session(fp32_path, 1)
    name = fp32.input.name
    return {"inputs": inputs, "name": name, "small": small, "large": large,
            "small_logits": logits(small, name, inputs), "large_logits": logits(large, name, inputs)}


@pytest.mark.parametrize("metric", ["margin", "confidence"])
def test_on_real_outputs_the_choice_is_the_cheapest_threshold_meeting_the_gate(outputs, metric):
    values = cascade.scores(outputs["small_logits"], metric)
    small_top1, large_top1 = outputs["small_logits"].argmax(1), outputs["large_logits"].argmax(1)
    points = cascade.sweep(values, small_top1, large_top1, FREE, COSTLY)
    # Every distinct value a cut, plus everything escalated (a threshold is at most 1).
    assert len(points) == len(np.unique(values)) + (values.max() < 1)
    assert points[0].escalated == 0 and points[0].agreement == pytest.approx(np.mean(small_top1 == large_top1))
    last = values < 1
    assert points[-1].escalated == pytest.approx(last.mean())
    assert points[-1].agreement == pytest.approx(np.mean(last | (small_top1 == large_top1)))
    # Escalating more never loses agreement: an escalated frame gets stage 2's own answer.
    pairs = zip(points, points[1:], strict=False)
    assert all(a.agreement <= b.agreement and a.escalated <= b.escalated for a, b in pairs)
    for gate in (0.9, 0.99):
        chosen = cascade.cheapest(points, gate)
        assert chosen.agreement >= gate
        assert all(p.agreement < gate for p in points if p.ms_batch1 < chosen.ms_batch1)
        # The point is what it says: recomputed from the threshold alone.
        escalated = values < chosen.threshold
        assert chosen.escalated == pytest.approx(escalated.mean())
        assert chosen.agreement == pytest.approx(np.mean(np.where(escalated, large_top1, small_top1) == large_top1))


def test_the_cross_check_chooses_on_one_half_and_measures_on_the_other(outputs):
    values = cascade.scores(outputs["small_logits"], "margin")
    small_top1, large_top1 = outputs["small_logits"].argmax(1), outputs["large_logits"].argmax(1)
    folds = cascade.cross_check(values, small_top1, large_top1, 0.95, FREE, COSTLY)
    assert [(f.chosen_on, f.samples) for f in folds] == [("even", 12), ("odd", 12)]
    for fold, (chose, measured) in zip(folds, ((0, 1), (1, 0)), strict=True):
        c, m = slice(chose, None, 2), slice(measured, None, 2)
        # Chosen at the gate plus one standard error of the measuring half's share, so the gate holds there.
        assert fold.threshold == cascade.cheapest(
            cascade.sweep(values[c], small_top1[c], large_top1[c], FREE, COSTLY), gate_target(0.95, 12)).threshold
        escalated = values[m] < fold.threshold
        assert fold.escalated == pytest.approx(escalated.mean())
        answers = np.where(escalated, large_top1[m], small_top1[m])
        assert fold.agreement == pytest.approx(np.mean(answers == large_top1[m]))


@pytest.mark.parametrize("batch", [1, 8])
def test_served_as_the_service_does_exactly_the_frames_under_the_threshold_escalate(outputs, batch):
    values = cascade.scores(outputs["small_logits"], "margin")
    threshold = float(np.median(values))
    served = cascade.serve(outputs["small"], outputs["large"], outputs["name"], outputs["inputs"], "margin",
                           threshold, batch)
    under = values < threshold
    assert served.escalated == under.sum() > 0
    expected = np.where(under, outputs["large_logits"].argmax(1), outputs["small_logits"].argmax(1))
    assert (served.top1 == expected).all()


def test_model_cascade_refuses_an_unknown_metric_before_loading_anything(tmp_path):
    result = CliRunner().invoke(cli.app, ["model", "cascade", str(tmp_path / "a"), str(tmp_path / "b"),
                                          "--metric", "entropy"])
    assert result.exit_code == 2
    assert result.stderr == "edgefleet model cascade: --metric is margin or confidence, not 'entropy'\n"


def test_assemble_replaces_only_an_earlier_cascade_never_a_member_or_other_folder(model_dir, tmp_path):
    from shared.cascade import verify_folder
    from shared.manifest import ModelError

    def assemble(out):
        return cascade.assemble(model_dir, model_dir, out, name="c", version=1, metric="margin", threshold=0.5)

    with pytest.raises(ModelError, match="holds the member"):
        assemble(model_dir)
    with pytest.raises(ModelError, match="holds the member"):
        assemble(model_dir.parent)
    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ModelError, match="not a cascade folder"):
        assemble(keep)
    assert (keep / "holiday.jpg").read_bytes() == b"precious" and load_verified(model_dir)
    assemble(tmp_path / "cascade")
    again = assemble(tmp_path / "cascade")  # an earlier cascade is replaced
    assert verify_folder(tmp_path / "cascade") == again and again.file == "cascade.json"


def test_a_threshold_is_chosen_one_standard_error_above_the_gate_capped_at_everything():
    assert gate_target(0.99, 150) == pytest.approx(0.99 + np.sqrt(0.99 * 0.01 / 150))
    assert gate_target(0.9, 1) == 1.0 and gate_target(1.0, 300) == 1.0
    assert gate_target(0.95, 0) == 0.95  # nothing to measure on: the gate itself
    assert gate_target(0.0, 10) == 0.0 and gate_target(-0.5, 10) == 0.0  # no gate: nothing to aim above


def test_static_int8_computes_its_logits_in_float_from_int8_weights(outputs, int8_dir, tmp_path):
    """The logits in `outputs` are this model's (the fixture reads int8_dir)."""
    small, path = load_verified(int8_dir)
    model = onnx.load(str(path))
    producers = {out: node for node in model.graph.node for out in node.output}
    classifier = producers[model.graph.output[0].name]
    assert classifier.op_type == "Gemm" and small.recipe["outputs"] == "float"
    weights = producers[classifier.input[1]]
    assert weights.op_type == "DequantizeLinear"
    assert next(i for i in model.graph.initializer if i.name == weights.input[0]).data_type == onnx.TensorProto.INT8
    # An 8-bit output takes at most 256 values per frame; these are the Gemm's float sums.
    assert all(len(np.unique(row)) > 256 for row in outputs["small_logits"])
    # As served: ONNX Runtime fuses the classifier into one QGemm (INT8 arithmetic) whose output is the logits.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "served.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=DISABLED_OPTIMIZERS)
    served = onnx.load(str(tmp_path / "served.onnx")).graph
    made_by = {out: node.op_type for node in served.node for out in node.output}
    assert made_by[served.output[0].name] == "QGemm" and "Gemm" not in made_by.values()
