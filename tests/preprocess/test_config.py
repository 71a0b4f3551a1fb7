"""The preprocessing configs load from YAML-like mappings and refuse bad values with the dotted key."""

from __future__ import annotations

import pytest

from rt_mindeye.config import from_mapping
from rt_mindeye.errors import ConfigError
from rt_mindeye.preprocess.config import AlignConfig, MaskConfig, MotionConfig


def test_motion_config_from_mapping():
    config = from_mapping(MotionConfig, {"engine": "sitk", "threads": 2, "fd_thresholds_mm": [0.1, 0.2, 0.5]},
                          source="session.yaml", prefix="motion")
    assert config.engine == "sitk" and config.threads == 2 and config.fd_thresholds_mm == (0.1, 0.2, 0.5)


@pytest.mark.parametrize("data, key", [
    ({"engine": "fsl"}, "motion.engine"),
    ({"n_sample_points": 10}, "motion.n_sample_points"),
    ({"reslice_interpolation": "cubic"}, "motion.reslice_interpolation"),
    ({"fd_thresholds_mm": [0.4, 0.3, 0.2]}, "motion"),
    ({"sample_points": 2000}, "motion.sample_points"),
])
def test_motion_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        from_mapping(MotionConfig, data, source="session.yaml", prefix="motion")
    assert info.value.key == key and info.value.source == "session.yaml"


def test_align_and_mask_configs_check_cross_field_rules():
    with pytest.raises(ConfigError, match="same length"):
        from_mapping(AlignConfig, {"shrink_factors": [4, 1]}, source="s.yaml", prefix="align")
    with pytest.raises(ConfigError, match="not both"):
        from_mapping(MaskConfig, {"reliability_threshold": 0.2, "reliability_top_n": 100}, source="s.yaml",
                     prefix="masks")
    assert from_mapping(MaskConfig, {"reliability_top_n": 2792}).reliability_top_n == 2792
