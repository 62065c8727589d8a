"""Pictures for real data: an AP axis scaled to the values, JPEG or PNG by suffix, boxes
and labels that stay inside the image."""
import numpy as np
from PIL import Image

from minidetr.training.plots import ap_axis_top, draw_detections, plot_ap

HISTORY = [{"epoch": 1, "AP": 0.01, "AP50": 0.03, "APl": -1},
           {"epoch": 2, "AP": 0.02, "AP50": 0.06, "APl": -1}]


def test_the_ap_axis_follows_the_data():
    assert abs(ap_axis_top(HISTORY) - 0.069) < 1e-9, "the axis should end 15% above 0.06"
    assert ap_axis_top([{"epoch": 1, "AP": 0.9, "AP50": 0.99}]) == 1.0
    assert ap_axis_top([{"epoch": 1, "AP": 0.0}]) == 0.01
    assert ap_axis_top([{"epoch": 1, "APl": -1}]) == 0.01      # -1 is "no data", not drawn


def test_plot_ap_with_undefined_metrics_writes_a_png(tmp_path):
    path = plot_ap(HISTORY, tmp_path / "ap.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_detections_outside_the_image_and_at_its_top_edge(tmp_path):
    image = Image.fromarray(np.full((60, 90, 3), 200, np.uint8))
    detections = {"scores": np.array([0.9, 0.8]), "labels": np.array([0, 1]),
                  "boxes": np.array([[-20.0, -5.0, 50.0, 30.0], [60.0, 2.0, 140.0, 90.0]])}
    jpg = draw_detections(image, detections, ["cat", "dog"], tmp_path / "d.jpg",
                          title="top edge")
    png = draw_detections(image, detections, ["cat", "dog"], tmp_path / "d.png")
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff", "a .jpg path must get a JPEG"
    assert png.read_bytes()[:4] == b"\x89PNG", "a .png path must get a PNG"
