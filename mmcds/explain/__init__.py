"""The explain stage: image saliency, note evidence, lab and modality attributions, summary."""
