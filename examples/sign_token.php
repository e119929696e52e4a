<?php
// Signs a Comet client token (HS256 JSON Web Token) without any library.
//   php sign_token.php SECRET CONN_ID [TTL_SECONDS] [INFO]

function b64url(string $data): string {
    return rtrim(strtr(base64_encode($data), '+/', '-_'), '=');
}

function comet_token(string $secret, string $connId, int $ttl = 3600, string $info = ''): string {
    $now = time();
    $header = ['alg' => 'HS256', 'typ' => 'JWT'];
    $claims = ['sub' => $connId, 'iat' => $now, 'exp' => $now + $ttl];
    if ($info !== '') {
        $claims['info'] = $info;
    }
    $input = b64url(json_encode($header)) . '.' . b64url(json_encode($claims));
    return $input . '.' . b64url(hash_hmac('sha256', $input, $secret, true));
}

if (PHP_SAPI === 'cli' && isset($argv[2])) {
    echo comet_token($argv[1], $argv[2], (int)($argv[3] ?? 3600), $argv[4] ?? ''), "\n";
}
