"""The Ray-free parts of the HTTP service (:mod:`mapl_ray.pipelines.serve` wires them into Ray Serve).

* :mod:`.settings`: every serving setting in one validated dataclass (CLI, Serve config, builder);
* :mod:`.errors`: the JSON error every refusal answers with, and how decoding errors map to it;
* :mod:`.inputs`: reading a bounded request body and turning it into uploads (raw image, multipart,
  JSON batch of base64 images);
* :mod:`.maps`: what is made from an anomaly map for a response (PNG heatmap, defect regions);
* :mod:`.schema`: the pydantic request / response models and the OpenAPI request body;
* :mod:`.auth`: the optional bearer token.
"""
