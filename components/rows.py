"""Names of the ablation table's rows: evaluation scores them, comparisons pairs them."""

ADAPTIVE, SIZE_BASED, IDEAL = "Adaptive (PRI)", "Size-based", "Ideal"
NOISE_ORACLE = "Noise oracle"  # Ideal's choice among noise copies of the mean scale feature
BICUBIC = "Bicubic + F"  # the baseline model: F trained on bicubic-enlarged x_l (ablation variant "bicubic")
BICUBIC_PROBES = "PRI's F, bicubic probes"  # diagnostic: PRI's own F on bicubic-enlarged probes (no G)
HR_PROBES = "HR probes"  # PRI's F on the probes' HR originals: what SR works toward
FFSR_RIFE = "FFSR + RIFE"  # the FFSR paper's model (ablation variant "ffsr_rife"): every image through FFSR then RIFE
RIFE_BICUBIC = "RIFE, bicubic probes"  # diagnostic: that model's RIFE alone, probes bicubic-enlarged, gallery as is
RIFE_PRI = "RIFE as F + PRI"  # PRI with RIFE as its re-id module (ablation variant "rife_pri"), adaptive scale
RIFE_PRI_BICUBIC = "RIFE as F, bicubic probes"  # diagnostic: RIFE as F + PRI's own RIFE on bicubic probes (no G)
