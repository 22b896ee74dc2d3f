"""The public measurement endpoints, in one package with the transfer slots they share:

- http.py: bbprobe's own download, upload and echo (/measure/v1/...);
- ndt7.py: M-Lab's ndt7 protocol (/ndt/v7/...), subtests archived;
- librespeed.py: LibreSpeed's backend (/backend/garbage.php, empty.php, getIP.php);
- page.py: the browser speed-test page (/speedtest);
- routes.py: registers them all;
- slots.py: at most ``max_concurrent`` transfers, ``max_concurrent_per_client`` per
  anonymous client, a share kept for probes' tickets, which are verified there;
- ledger.py: what each ticket has used (transfers at once, bytes, busy seconds).

Everything here is public (role "public"), so everything is bounded: bytes, seconds and
concurrent transfers per client.
"""
