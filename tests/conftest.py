"""Shared fixtures. The test suite never touches the network: the Hub libraries are put in offline mode."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def real_images():
    """Eight 32x32 RGB crops of photos shipped inside scikit-image, as uint8 arrays (H, W, 3)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for photo in photos:
        h, w = photo.shape[:2]
        for top, left in ((h // 3, w // 3), (h // 2, w // 2)):
            patch = photo[top:top + 128:4, left:left + 128:4]  # 128px area downsampled to 32x32
            crops.append(np.ascontiguousarray(patch[:, :, :3]))
    return crops


@pytest.fixture
def single_thread():
    """Tiny models are dispatch-bound: extra intra-op threads only add synchronisation on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fid_weights_file(tmp_path_factory):
    """A randomly initialized state dict of torch-fidelity's FID Inception-v3, saved like the real weights file.

    Built without the network: the download inside the constructor is replaced by the module's own random
    initialization. It exercises the real architecture and loading path; its distances are not real FIDs.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("fid") / "weights-inception-random.pth"
    torch.save(network.state_dict(), path)
    return path
