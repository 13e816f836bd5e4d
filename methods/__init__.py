"""The method plugins shipped with mugbench: one module per method, each registering itself."""
