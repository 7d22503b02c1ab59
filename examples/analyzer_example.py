"""The documented GradientNoiseAnalyzer example (seed 000), with lightning_gns, on real data.

python examples/analyzer_example.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseAnalyzer

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32)
x = (x - x.mean(0)) / (x.std(0) + 1e-6)
dataset = TensorDataset(x, torch.tensor(digits.target))
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))
criterion = nn.CrossEntropyLoss()
data_loader = DataLoader(dataset, batch_size=32, shuffle=True)

analyzer = GradientNoiseAnalyzer(model, criterion, data_loader)
results = analyzer.analyze(num_batches=30)

print(f"Current batch size: {results['current_batch_size']}")
print(f"Optimal batch size: {results['optimal_batch_size']}")
print(f"Gradient noise scale: {results['gradient_noise_scale']:.2f}")

if results["optimal_batch_size"] < results["current_batch_size"]:
    print(f"💡 Try reducing batch size to {results['optimal_batch_size']}")
elif results["optimal_batch_size"] > results["current_batch_size"]:
    print(f"💡 Try increasing batch size to {results['optimal_batch_size']}")
else:
    print("✅ Batch size is optimal!")

# Batch size comparison
for batch_size in [16, 32, 64, 128]:
    loader = DataLoader(dataset, batch_size=batch_size)
    analyzer = GradientNoiseAnalyzer(model, criterion, loader, verbose=False)
    results = analyzer.analyze()
    print(f"Batch {batch_size}: Optimal = {results['optimal_batch_size']}")
