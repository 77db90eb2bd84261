{
  "targets": [
    {
      "target_name": "udm_fileops",
      "sources": ["fileops.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE", "_FILE_OFFSET_BITS=64"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
