"""DafneSlicer federated server: model families and versions, validated delta uploads, robust
asynchronous merging gated on validation Dice, and a dashboard. See README "Federated server"."""
