# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "variables"];
set :upper "box" "MiXeD";
fileinto "${box}";
