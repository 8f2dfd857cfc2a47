import torch

from dse.config import DataConfig
from dse.training.data import augment_batch, digits_split, epoch_loader, load_data


def test_digits_shapes_and_split():
    bundle = load_data(DataConfig(img_size=32, val_fraction=0.2), seed=0)
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= int(y) < 10
    assert len(bundle.train) + len(bundle.val) == 1797
    assert abs(len(bundle.val) - 0.2 * 1797) <= 1
    # the 3 channels are identical grey copies, normalised to roughly unit scale
    img = bundle.val[0][0]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    all_x = torch.stack([bundle.train[i][0] for i in range(200)])
    assert abs(all_x.mean().item()) < 0.3 and 0.6 < all_x.std().item() < 1.4


def test_split_is_seeded_and_disjoint():
    a_train, a_val = digits_split(0.2, seed=0)
    b_train, b_val = digits_split(0.2, seed=0)
    c_train, c_val = digits_split(0.2, seed=1)
    assert a_val == b_val and a_train == b_train
    assert a_val != c_val
    assert not set(a_train) & set(a_val)


def test_epoch_loader_order_depends_only_on_seed_and_epoch():
    ds = load_data(DataConfig(img_size=16), seed=0).train
    first = [y.tolist() for _, y in epoch_loader(ds, 64, shuffle=True, seed=3, epoch=2)]
    again = [y.tolist() for _, y in epoch_loader(ds, 64, shuffle=True, seed=3, epoch=2)]
    other = [y.tolist() for _, y in epoch_loader(ds, 64, shuffle=True, seed=3, epoch=3)]
    assert first == again and first != other


def test_augment_is_deterministic_and_keeps_shape():
    x = torch.randn(4, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
