# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto", "variables"];
if header :matches "subject" "Grüße aus *" { fileinto "city-${1}"; }
