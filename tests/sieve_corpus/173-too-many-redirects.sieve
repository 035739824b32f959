# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
redirect "r0@example.net";
redirect "r1@example.net";
redirect "r2@example.net";
redirect "r3@example.net";
redirect "r4@example.net";
redirect "r5@example.net";
