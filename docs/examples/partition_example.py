"""Split 10,000 labelled samples among 20 envoys with label skew, then look at what each envoy got."""
import matplotlib

matplotlib.use("Agg")  # no display needed; in a notebook leave this out and the chart shows inline

import numpy as np

from fedjax_core import partition

labels = np.random.default_rng(0).integers(0, 10, 10_000)  # e.g. CIFAR-10's train labels

p = partition.dirichlet(n_envoys=20, alpha=0.3, seed=0)
parts = p(labels)  # 20 sorted int64 index arrays: disjoint, covering all 10,000 samples
assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))

counts = partition.label_counts(parts, labels)  # [20, 10]: samples of each class per envoy
print("classes per envoy:", (counts > 0).sum(axis=1))
envoy_3 = parts[3]  # x[envoy_3], labels[envoy_3] are envoy 3's data

ax = partition.plot_label_counts(parts, labels, title="Dirichlet(0.3) over 20 envoys")
ax.figure.savefig("label_counts.png", bbox_inches="tight")
