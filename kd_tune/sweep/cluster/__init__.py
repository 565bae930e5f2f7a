"""The Ray cluster a sweep runs on and its jobs: joining or starting Ray and checking what its nodes see
(``connect``), and the job server a sweep is submitted to from a laptop (``jobs``, ``job_server``, ``ray_token``)."""
