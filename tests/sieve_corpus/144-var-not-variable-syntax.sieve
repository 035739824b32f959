# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
fileinto "a${1bad}b${}c";
